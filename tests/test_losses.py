"""Tests of losses.py: the loss table (each loss's network, default score, sampler, margin and
miner), each loss object called with (model, Batch), the design's pair BCE, the metric-learning
losses and miners, and the fraction of active pairs or triplets."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses, miners
from pytorch_metric_learning.utils import distributed as pml_distributed

from config import RunConfig
from losses import LOSSES, Batch, BatchResult, active_fraction, build_model, metric_loss, pair_bce
from helpers import tiny_config
from modules import EmbeddingNetwork, ImageClassifier, SiameseNetwork, last_stage
from scoring import SCORE_METHODS, applicable_scores, resolve_score

SIZE = 32
pytestmark = pytest.mark.usefixtures("single_torch_thread")


def config_for(loss, **extra):
    """A tiny run's config, with the margin and miner train.make_config gives the loss."""
    return tiny_config(loss, **{"margin": LOSSES[loss].margin, "miner": LOSSES[loss].miner, **extra})


@pytest.fixture(scope="module")
def images():
    return torch.randn(6, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def batch_of(images, pairing="embed-once"):
    """A Batch as train.on_device makes it: six images of both classes and four pairs drawn among
    them (two of the same class, two not); two-pass: the pairs' second images instead."""
    labels = torch.tensor([0, 1, 0, 1, 0, 1])
    anchors, partners = torch.tensor([0, 1, 2, 3]), torch.tensor([2, 3, 1, 0])
    targets = (labels[anchors] == labels[partners]).float()
    if pairing == "two-pass":
        return Batch(images[anchors], None, None, None, targets, images[partners])
    return Batch(images, labels, anchors, partners, targets)


# ---------------------------------------------------------------------------------------------
# The loss table and build_model


@pytest.mark.parametrize("name", list(LOSSES))
def test_each_loss_row_builds_its_network_and_its_default_score_applies(name):
    loss = LOSSES[name]
    model = build_model(config_for(name))
    assert type(model) is loss.network
    assert isinstance(model, {"bce": SiameseNetwork, "ce": ImageClassifier}.get(name, EmbeddingNetwork))
    assert resolve_score(config_for(name)) == loss.default_score in applicable_scores(config_for(name))
    # the metric losses hold pytorch-metric-learning's loss and report their active fraction
    made = loss(config_for(name, margin=0.3, miner="all"))
    assert (getattr(made, "loss", None) is None) == (not loss.reports_active)
    assert (loss.sampler == "balanced") == loss.reports_active  # metric losses need both classes per batch


def test_the_metric_losses_default_margins_and_miners():
    assert (LOSSES["contrastive"].margin, LOSSES["contrastive"].miner) == (0.5, "all")
    assert (LOSSES["triplet"].margin, LOSSES["triplet"].miner) == (0.2, "semihard")
    assert all(LOSSES[name].margin is None and LOSSES[name].miner is None for name in ("bce", "ce"))


@pytest.mark.parametrize("loss, kind", [("bce", SiameseNetwork), ("contrastive", EmbeddingNetwork),
                                        ("triplet", EmbeddingNetwork), ("ce", ImageClassifier)])
def test_build_model_picks_the_network_for_the_loss(loss, kind):
    model = build_model(config_for(loss))
    assert type(model) is kind
    if kind is EmbeddingNetwork:
        assert model.projection.out_features == 16


def test_build_model_weights_argument_overrides_the_config(offline):
    model = build_model(config_for("bce", weights="imagenet"), weights="none")
    assert isinstance(model, SiameseNetwork) and offline == [None]


def test_build_model_of_an_unknown_loss_names_it():
    with pytest.raises(KeyError, match="banana"):
        build_model(RunConfig(loss="banana", weights="none"))


def test_bce_with_an_auxiliary_weight_builds_the_siamese_classifier():
    assert build_model(config_for("bce")).classifier is None
    model = build_model(config_for("bce", aux_weight=0.5))
    assert model.classifier is not None and model.classifies


# ---------------------------------------------------------------------------------------------
# The network decides which scores apply


@pytest.mark.parametrize("name, aux_weight", [("bce", 0.0), ("bce", 1.0), ("contrastive", 0.0), ("triplet", 0.0),
                                              ("ce", 0.0)])
def test_the_networks_own_attributes_decide_which_scores_resolve_score_allows(name, aux_weight):
    config = config_for(name, aux_weight=aux_weight)
    model = build_model(config)
    allowed = applicable_scores(config)
    assert ("head-knn" in allowed) == model.pair_head == LOSSES[name].network.pair_head
    assert ("direct" in allowed) == model.classifies
    assert ("direct" in allowed) == (getattr(model, "classifier", None) is not None)  # what --score direct uses
    assert {"gallery", "knn", "prototype", "probe"} <= set(allowed) <= set(SCORE_METHODS)
    for method in set(SCORE_METHODS) - set(allowed):
        with pytest.raises(ValueError, match=f"--score {method}"):
            resolve_score(config, method)


def test_resolve_score_reads_the_network_class_not_the_loss_name(monkeypatch):
    """A network that gains the Siamese head or loses its classifier changes what resolve_score
    allows, with no table of loss names to keep in step."""
    with pytest.raises(ValueError):
        resolve_score(config_for("triplet"), "head-knn")
    monkeypatch.setattr(EmbeddingNetwork, "pair_head", True)
    assert resolve_score(config_for("triplet"), "head-knn") == "head-knn"
    assert resolve_score(config_for("ce"), "direct") == "direct"
    monkeypatch.setattr(ImageClassifier, "classifies", False)
    with pytest.raises(ValueError, match="--score direct"):
        resolve_score(config_for("ce"), "direct")


# ---------------------------------------------------------------------------------------------
# Each loss called with (model, Batch)


@pytest.mark.parametrize("name, extra", [("bce", {}), ("bce", {"aux_weight": 1.0}),
                                         ("bce", {"pairing": "two-pass"}), ("contrastive", {}), ("triplet", {}),
                                         ("triplet", {"miner": "all"}), ("ce", {})])
def test_each_loss_gives_a_finite_loss_with_a_gradient_for_a_tiny_model(name, extra, images):
    torch.manual_seed(0)
    config = config_for(name, **extra)
    model = build_model(config).train()
    batch = batch_of(images, config.pairing if name == "bce" else "embed-once")
    result = LOSSES[name](config, pos_weight=torch.tensor(1.5))(model, batch)
    assert isinstance(result, BatchResult)
    assert result.loss.ndim == 0 and math.isfinite(result.loss.item()) and result.loss.requires_grad
    assert result.count == (len(batch.labels) if name == "ce" else len(batch.targets))
    assert 0 <= int(result.correct) <= result.count
    if LOSSES[name].reports_active:
        assert 0 <= result.active <= 1
    else:
        assert math.isnan(result.active)
    result.loss.backward()
    stage = list(last_stage(model).parameters())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in stage)
    assert any(p.grad.abs().sum() > 0 for p in stage)  # the backbone learns, not only the head


def test_pair_bce_is_bce_with_logits_and_counts_pairs_on_the_right_side_of_one_half():
    logits = torch.tensor([2.0, -1.0, 0.5, -3.0])
    targets = torch.tensor([1.0, 1.0, 0.0, 0.0])
    loss, correct = pair_bce(logits, targets)
    by_hand = (math.log1p(math.exp(-2)) + math.log1p(math.exp(1)) + math.log1p(math.exp(0.5))
               + math.log1p(math.exp(-3))) / 4
    assert loss.item() == pytest.approx(by_hand, rel=1e-6)
    assert int(correct) == 2  # the first and the last
    half, _ = pair_bce(logits.half(), targets)  # autocast's fp16 logits: the loss in float32
    assert half.dtype == torch.float32 and half.item() == pytest.approx(by_hand, rel=1e-3)


def test_bce_loss_is_the_pair_bce_plus_the_weighted_auxiliary_classifier_loss(images):
    torch.manual_seed(0)
    config = config_for("bce", aux_weight=0.7)
    model = build_model(config).eval()  # no dropout: every call sees the same network
    batch = batch_of(images)
    with torch.no_grad():
        result = LOSSES["bce"](config, pos_weight=torch.tensor(3.0))(model, batch)
        features = model.embed(images)
        pair_loss, correct = pair_bce(model.pair_logits(features[batch.anchors], features[batch.partners]),
                                      batch.targets)
        class_logits = model.classifier(features).squeeze(1)
        weighted = F.binary_cross_entropy_with_logits(class_logits, batch.labels.float(), pos_weight=torch.tensor(3.0))
        unweighted = F.binary_cross_entropy_with_logits(class_logits, batch.labels.float())
        pair_only = LOSSES["bce"](config_for("bce"), pos_weight=torch.tensor(3.0))(model, batch)
    assert result.loss.item() == pytest.approx(pair_loss.item() + 0.7 * weighted.item(), rel=1e-5)
    assert weighted.item() != pytest.approx(unweighted.item(), rel=1e-3)  # pos_weight is applied
    assert pair_only.loss.item() == pytest.approx(pair_loss.item(), rel=1e-5)
    assert int(result.correct) == int(correct)


def test_bce_two_pass_scores_each_pairs_two_images(images):
    torch.manual_seed(0)
    config = config_for("bce", pairing="two-pass")
    model = build_model(config).eval()
    batch = batch_of(images, "two-pass")
    with torch.no_grad():
        result = LOSSES["bce"](config)(model, batch)
        expected, _ = pair_bce(model(batch.images, batch.partner_images), batch.targets)
    assert batch.labels is None and result.count == 4
    assert result.loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_ce_loss_is_class_weighted_bce_of_each_images_logit(images):
    torch.manual_seed(0)
    config = config_for("ce")
    model = build_model(config).eval()
    batch = batch_of(images)
    with torch.no_grad():
        result = LOSSES["ce"](config, pos_weight=torch.tensor(2.0))(model, batch)
        logits = model(images)
    expected = F.binary_cross_entropy_with_logits(logits, batch.labels.float(), pos_weight=torch.tensor(2.0))
    assert result.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert int(result.correct) == int(((logits > 0) == (batch.labels == 1)).sum())
    assert result.count == 6


@pytest.mark.parametrize("name", ["contrastive", "triplet"])
def test_metric_loss_object_is_the_pml_loss_on_the_embeddings_and_reports_its_active_fraction(name, images):
    torch.manual_seed(0)
    config = config_for(name, margin=0.4, miner="all")
    model = build_model(config).eval()
    batch = batch_of(images)
    with torch.no_grad():
        result = LOSSES[name](config)(model, batch)
        embeddings = model(images)
    pml_loss, miner = metric_loss(name, 0.4, "all")
    expected = pml_loss(embeddings, batch.labels, miner(embeddings, batch.labels) if miner else None)
    assert result.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert result.active == pytest.approx(active_fraction(embeddings, batch.labels, name, 0.4))
    agree = (embeddings[batch.anchors] * embeddings[batch.partners]).sum(1) > 0
    assert int(result.correct) == int((agree == (batch.targets > 0.5)).sum()) and result.count == 4


def test_world_size_scale_is_the_ranks_only_for_the_wrapped_metric_losses():
    for name in ("contrastive", "triplet"):
        one, two = LOSSES[name](config_for(name)), LOSSES[name](config_for(name), world_size=2)
        assert one.world_size_scale == 1 and two.world_size_scale == 2
        assert not isinstance(one.loss, pml_distributed.DistributedLossWrapper)
        assert isinstance(two.loss, pml_distributed.DistributedLossWrapper)
    for name in ("bce", "ce"):
        assert LOSSES[name](config_for(name), world_size=2).world_size_scale == 1


# ---------------------------------------------------------------------------------------------
# Metric-learning losses and their active fraction


def test_metric_loss_contrastive_with_all_pairs_has_no_miner():
    loss, miner = metric_loss("contrastive", 0.7, "all")
    assert isinstance(loss, losses.ContrastiveLoss) and miner is None
    assert loss.neg_margin == 0.7 and loss.pos_margin == 0.0


@pytest.mark.parametrize("name, kind", [("contrastive", losses.ContrastiveLoss), ("triplet", losses.TripletMarginLoss)])
@pytest.mark.parametrize("miner_name", ["semihard", "hard"])
def test_metric_loss_returns_the_pml_loss_and_triplet_miner(name, kind, miner_name):
    loss, miner = metric_loss(name, 0.3, miner_name)
    assert isinstance(loss, kind)
    assert isinstance(miner, miners.TripletMarginMiner)
    assert miner.margin == 0.3 and miner.type_of_triplets == miner_name
    if name == "triplet":
        assert loss.margin == 0.3
    embeddings = F.normalize(torch.randn(12, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    labels = torch.tensor([0, 1] * 6)
    value = loss(embeddings, labels, miner(embeddings, labels))
    assert value.ndim == 0 and math.isfinite(value.item())


def test_metric_loss_triplet_with_all_uses_every_triplet():
    loss, miner = metric_loss("triplet", 0.2, "all")
    assert isinstance(loss, losses.TripletMarginLoss) and miner.type_of_triplets == "all"


def test_metric_loss_for_several_processes_wraps_the_loss_and_the_miner():
    loss, miner = metric_loss("triplet", 0.2, "semihard", world_size=2)
    assert isinstance(loss, pml_distributed.DistributedLossWrapper)
    assert isinstance(miner, pml_distributed.DistributedMinerWrapper)
    loss, miner = metric_loss("contrastive", 0.5, "all", world_size=2)
    assert isinstance(loss, pml_distributed.DistributedLossWrapper) and miner is None


def brute_force_active(embeddings, labels, name, margin):
    points, labels = embeddings.double().tolist(), labels.tolist()
    n = len(points)
    if name == "contrastive":
        active = total = 0
        for i, j in itertools.permutations(range(n), 2):
            d = math.dist(points[i], points[j])
            total += 1
            active += (d > 0) if labels[i] == labels[j] else (d < margin)
        return active / total
    active = total = 0
    for a, p, q in itertools.product(range(n), repeat=3):
        if p != a and labels[p] == labels[a] and labels[q] != labels[a]:
            total += 1
            active += math.dist(points[a], points[p]) - math.dist(points[a], points[q]) + margin > 0
    return active / total


@pytest.mark.parametrize("name, margin", [("contrastive", 0.5), ("contrastive", 1.2), ("triplet", 0.05),
                                          ("triplet", 0.2), ("triplet", 1.0)])
@pytest.mark.parametrize("seed", [0, 1])
def test_active_fraction_equals_brute_force(name, margin, seed):
    generator = torch.Generator().manual_seed(seed)
    embeddings = F.normalize(torch.randn(14, 6, generator=generator), dim=1)
    labels = torch.randint(0, 2, (14,), generator=generator)
    labels[:2] = torch.tensor([0, 1])
    expected = brute_force_active(embeddings, labels, name, margin)
    assert 0 < expected < 1  # a case where counting mistakes show
    assert active_fraction(embeddings, labels, name, margin) == pytest.approx(expected, abs=1e-6)


def test_active_fraction_on_collapsed_embeddings():
    embeddings = F.normalize(torch.ones(30, 8), dim=1)  # every image the same point (30 rows: cdist's mm path)
    labels = torch.tensor([0] * 20 + [1] * 10)
    for margin in (0.2, 0.01):
        assert active_fraction(embeddings, labels, "triplet", margin) == 1.0
    # contrastive: every negative pair is inside the margin, no positive pair is apart
    negatives, pairs = 2 * 20 * 10, 30 * 29
    assert active_fraction(embeddings, labels, "contrastive", 0.5) == pytest.approx(negatives / pairs)
    assert active_fraction(embeddings, labels, "triplet", 0.0) == 0.0
