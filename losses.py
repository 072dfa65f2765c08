"""The training losses: each --loss is one small object, made from the run's config and called
with (model, batch), returning a BatchResult. Its class says which network it trains (modules.py),
which batches it needs and how its images are scored by default. LOSSES is the one table of them:
adding a loss adds a class and a row here.
"""
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses, miners
from pytorch_metric_learning.utils import distributed as pml_distributed

from modules import EmbeddingNetwork, ImageClassifier, SiameseNetwork


class Batch(NamedTuple):
    """One training batch on the device: images, their labels and the design's pairs drawn inside it
    (anchor and partner rows, target 1 for the same class). --pairing two-pass: `partner_images`
    holds each pair's second image, and `labels` is None."""
    images: torch.Tensor
    labels: torch.Tensor | None
    anchors: torch.Tensor | None
    partners: torch.Tensor | None
    targets: torch.Tensor
    partner_images: torch.Tensor | None = None


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


class WeightedBCE:
    """What the two BCE losses share: a class-weighted malignant logit (pos_weight), any --sampler,
    no margin or miner."""
    sampler = None        # --sampler chooses
    margin = None
    miner = None
    reports_active = False

    def __init__(self, config, pos_weight=None, world_size=1):
        self.aux_weight, self.pos_weight = config.aux_weight, pos_weight
        self.world_size_scale = 1  # what DDP multiplies the reported loss by


class PairBCE(WeightedBCE):
    """bce, the design: BCE on the Siamese head's similarity of the batch's pairs, plus --aux-weight
    times a class-weighted BCE of each image's malignant logit on the same features."""
    network = SiameseNetwork
    default_score = "gallery"

    @staticmethod
    def build_network(config, weights):
        return SiameseNetwork(weights, config.aux_weight > 0, config.backbone, config.features)

    def __call__(self, model, batch):
        if batch.partner_images is not None:  # two-pass: the study's pair dataset
            return BatchResult(*pair_bce(model(batch.images, batch.partner_images), batch.targets), len(batch.targets))
        pairs = (batch.anchors, batch.partners)
        if self.aux_weight == 0:
            return BatchResult(*pair_bce(model(batch.images, pairs=pairs), batch.targets), len(batch.targets))
        logits, class_logits = model(batch.images, pairs=pairs, with_class_logits=True)
        loss, correct = pair_bce(logits, batch.targets)
        class_loss = F.binary_cross_entropy_with_logits(class_logits.float(), batch.labels.float(),
                                                        pos_weight=self.pos_weight)
        return BatchResult(loss + self.aux_weight * class_loss, correct, len(batch.targets))


class ClassifierBCE(WeightedBCE):
    """ce, the plain classifier baseline: class-weighted BCE of each image's malignant logit."""
    network = ImageClassifier
    default_score = "direct"

    @staticmethod
    def build_network(config, weights):
        return ImageClassifier(weights, config.backbone, config.features)

    def __call__(self, model, batch):
        logits = model(batch.images).float()
        loss = F.binary_cross_entropy_with_logits(logits, batch.labels.float(), pos_weight=self.pos_weight)
        return BatchResult(loss, ((logits > 0) == (batch.labels == 1)).sum(), len(batch.labels))


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


class Contrastive:
    """contrastive: pytorch-metric-learning's loss (and miner) on the batch's L2-normalised
    embeddings; the pairs only measure accuracy (cosine > 0 means "same class")."""
    name = "contrastive"
    network = EmbeddingNetwork
    default_score = "gallery"
    sampler = "balanced"  # always: every batch holds both classes
    margin = 0.5
    miner = "all"
    reports_active = True

    def __init__(self, config, pos_weight=None, world_size=1):
        self.loss, self.miner_function = metric_loss(self.name, config.margin, config.miner, world_size)
        self.run_margin = config.margin  # the run's --margin (the class's margin is its default)
        self.world_size_scale = world_size  # pytorch-metric-learning's DDP wrapper scales the loss by it

    @staticmethod
    def build_network(config, weights):
        return EmbeddingNetwork(weights, config.embed_dim, config.backbone, config.features)

    def __call__(self, model, batch):
        embeddings = model(batch.images).float()
        mined = self.miner_function(embeddings, batch.labels) if self.miner_function else None
        loss = self.loss(embeddings, batch.labels, mined)
        agree = (embeddings[batch.anchors] * embeddings[batch.partners]).sum(1) > 0  # (1 + cos) / 2 > 0.5
        active = active_fraction(embeddings.detach(), batch.labels, self.name, self.run_margin)
        return BatchResult(loss, (agree == (batch.targets > 0.5)).sum(), len(batch.targets), active)


class Triplet(Contrastive):
    """triplet: as contrastive, with pytorch-metric-learning's triplet margin loss."""
    name = "triplet"
    margin = 0.2
    miner = "semihard"


LOSSES = {"bce": PairBCE, "contrastive": Contrastive, "triplet": Triplet, "ce": ClassifierBCE}


def build_model(config, weights=None):
    """The network a config's loss trains; weights overrides config.weights (loading a checkpoint)."""
    if config.loss not in LOSSES:
        raise KeyError(f"unknown loss {config.loss!r}")
    return LOSSES[config.loss].build_network(config, config.weights if weights is None else weights)
