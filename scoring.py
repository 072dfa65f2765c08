"""Embedding and image-level scores: the embed-and-score core that validation during training
(train.py) and evaluation (predict.py) share.

    embed_and_score   a gallery from the training split, every split embedded once and scored
    score_images      P(malignant) per image by each --score method (formulas: predict.py's docstring)
    embed_images      features of a split's images (--tta: the mean over the four flips; DDP-aware)
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch.utils.data import DataLoader

from cli import progress
from dataset import ImageDataset, collate_images, eval_transform, make_pairs
from metrics import pair_metrics
from devices import autocast, to_device
from losses import LOSSES

# --score: how an image's P(malignant) is computed (predict.py's docstring gives each formula);
# auto: the loss's own (losses.LOSSES)
SCORE_METHODS = ("gallery", "head-knn", "knn", "prototype", "direct", "probe")
SCORES = ("auto", *SCORE_METHODS)


# ---------------------------------------------------------------------------------------------
# Embedding and scoring


def flip_views(images):
    """A batch and its horizontal, vertical and double flips: the views --tta averages over."""
    return [images, images.flip(3), images.flip(2), images.flip(2, 3)]


@dataclass(frozen=True)
class Embedding:
    """How images are embedded: input size, batch size, device, DataLoader workers, mixed
    precision, this process's rank of world_size (DDP), and --tta."""
    image_size: int
    batch_size: int
    device: torch.device
    workers: int = 0
    amp: bool = True
    rank: int = 0
    world_size: int = 1
    tta: bool = False


@torch.no_grad()
def embed_images(model, split, how, indices=None, desc="embedding"):
    """Features of the split's images (all, or `indices`), one backbone pass per image, in
    batches (four with how.tta: the mean over the image and its horizontal, vertical and double
    flips). Under DDP each rank embeds every world_size-th image and the rows are gathered.
    `desc` labels the progress bar."""
    indices = list(range(len(split))) if indices is None else [int(i) for i in indices]
    device, world_size = how.device, how.world_size
    loader = DataLoader(ImageDataset(split, eval_transform(how.image_size)), batch_size=how.batch_size,
                        sampler=indices[how.rank::world_size], num_workers=how.workers, collate_fn=collate_images,
                        pin_memory=device.type == "cuda", generator=torch.Generator())
    model.eval()
    rows = []
    with autocast(device, how.amp):
        for images, *_ in progress(loader, desc, disable=how.rank != 0, leave=False):
            images = to_device(images, device)
            views = flip_views(images) if how.tta else [images]
            rows.append(torch.stack([model.embed(view).float() for view in views]).mean(0))
    features = torch.cat(rows) if rows else torch.empty(0, device=device)
    if world_size == 1:
        return features
    # Pad to equal length, gather, and put rank r's rows back at positions r, r + W, ...
    longest = -(-len(indices) // world_size)
    padded = torch.zeros(longest, features.shape[1], device=features.device)
    padded[:len(features)] = features
    gathered = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded)
    full = torch.empty(len(indices), features.shape[1], device=features.device)
    for r, rows_r in enumerate(gathered):
        count = len(indices[r::world_size])
        full[r::world_size] = rows_r[:count]
    return full


@torch.no_grad()
def similarity_matrix(model, features, gallery_features, chunk=1 << 24, logits=False):
    """(N, G) P(same class) of every image with every gallery image, from stored features, in row
    blocks of about `chunk` hidden values; `logits`: the Siamese head's logits instead."""
    model.eval()
    out = torch.empty(len(features), len(gallery_features), device=features.device)
    rows = max(1, chunk // (64 * max(1, len(gallery_features))))
    for start in range(0, len(features), rows):
        block = features[start:start + rows]
        if logits:
            out[start:start + rows] = model.similarity_logits(block, gallery_features).float()
        elif hasattr(model, "similarity_matrix"):  # the Siamese head, without the N * G inputs
            out[start:start + rows] = model.similarity_matrix(block, gallery_features).float()
        else:
            f1 = block.repeat_interleave(len(gallery_features), 0)
            f2 = gallery_features.repeat(len(block), 1)
            out[start:start + rows] = model.pair_similarity(f1, f2).float().view(len(block), len(gallery_features))
    return out


PROBE_C = 0.1  # the probe's inverse L2 strength: few-shot galleries leave nothing to choose it on


def logistic_probe(c=PROBE_C):
    """scikit-learn's logistic regression on standardised features, the classes weighted alike:
    the probe score, and frozen.py's baseline."""
    return make_pipeline(StandardScaler(), LogisticRegression(C=c, class_weight="balanced", max_iter=5000))


@torch.no_grad()
def score_images(model, features, gallery_features, gallery_labels, method, k=10):
    """P(malignant) per image from stored features (see predict.py's docstring for the formulas)."""
    malignant = gallery_labels == 1
    if method == "direct":
        return model.malignant_probability(features).float()
    if method == "probe":  # fitted on the gallery each time: deterministic, and a second on CPU
        probe = logistic_probe().fit(gallery_features.float().cpu().numpy(), gallery_labels.cpu().numpy())
        return torch.as_tensor(probe.predict_proba(features.float().cpu().numpy())[:, 1], dtype=torch.float32,
                               device=features.device)
    if method in ("gallery", "head-knn"):
        similarity = similarity_matrix(model, features, gallery_features)
        if method == "head-knn":
            nearest, positions = similarity.topk(min(k, len(gallery_features)), dim=1)
            return (nearest * malignant[positions]).sum(1) / nearest.sum(1).clamp(min=1e-12)
        return (similarity[:, malignant].mean(1) + (1 - similarity[:, ~malignant]).mean(1)) / 2
    x, g = F.normalize(features.float(), dim=1), F.normalize(gallery_features.float(), dim=1)
    if method == "knn":
        nearest = cosine_similarity(x, g).topk(min(k, len(g)), dim=1).indices
        return malignant[nearest].float().mean(1)
    if method == "prototype":
        d_benign = (x - g[~malignant].mean(0)).norm(dim=1)
        d_malignant = (x - g[malignant].mean(0)).norm(dim=1)
        return d_benign / (d_benign + d_malignant).clamp(min=1e-12)
    raise ValueError(f"unknown score method {method}")


def cosine_similarity(features, gallery_features):
    return F.normalize(features.float(), dim=1) @ F.normalize(gallery_features.float(), dim=1).T


def retrieval_similarities(model, features, gallery_features):
    """{name: (N, G) similarity} by which the nearest gallery images can be ranked: the
    embedding's cosine for every model, and the Siamese head's logit where there is one."""
    rankings = {"cosine": cosine_similarity(features, gallery_features)}
    if hasattr(model, "similarity_logits"):
        rankings["head"] = similarity_matrix(model, features, gallery_features, logits=True)
    return rankings


def resolve_score(config, method="auto"):
    """--score auto: the loss's default score (losses.LOSSES); an explicit choice the model's
    network cannot compute is refused."""
    loss = LOSSES[config.loss]
    if method == "auto":
        return loss.default_score
    if method == "direct" and not (loss.network.classifies or (loss.network.pair_head and config.aux_weight > 0)):
        raise ValueError("--score direct needs a --loss ce model or a bce model trained with --aux-weight; "
                         "use gallery, head-knn, knn or prototype")
    if method == "head-knn" and not loss.network.pair_head:
        raise ValueError("--score head-knn needs the Siamese head of a --loss bce model; use knn")
    return method


def applicable_scores(config):
    """Every --score method this model supports."""
    methods = []
    for method in SCORES[1:]:
        try:
            methods.append(resolve_score(config, method))
        except ValueError:
            pass
    return methods


def choose_gallery(labels, per_class, seed):
    """A seeded, class-balanced sample of training indices (all of a class if it is smaller;
    per_class 0: every training image)."""
    rng = np.random.default_rng(seed)
    picks = []
    for c in (0, 1):
        pool = np.flatnonzero(np.asarray(labels) == c)
        picks.append(rng.choice(pool, min(per_class or len(pool), len(pool)), replace=False))
    return np.sort(np.concatenate(picks))


@dataclass
class ScoredSplit:
    """One split embedded and scored against the gallery: its features and labels,
    P(malignant) per image, and the design's fixed pairs (make_pairs) with their metrics."""
    features: torch.Tensor
    labels: np.ndarray
    scores: np.ndarray
    pair_summary: dict
    pairs: tuple  # (partner per image, target per pair, similarity per pair)


@torch.no_grad()
def score_split(model, features, labels, gallery, method, k, seed):
    """A split's stored features scored: P(malignant) per image against the gallery
    ({features, labels}), and the design's pair metrics on the split's fixed pairs."""
    scores = score_images(model, features, gallery["features"], gallery["labels"], method, k)
    partners, targets = make_pairs(labels, seed)
    similarity = model.pair_similarity(features, features[torch.as_tensor(partners, device=features.device)])
    similarity = similarity.float().cpu().numpy()
    return ScoredSplit(features, np.asarray(labels), scores.cpu().numpy(), pair_metrics(similarity, targets),
                       (partners, targets, similarity))


def embed_gallery(train, per_class, seed, embed):
    """{features, labels, paths} of a seeded, class-balanced sample of the training split
    (per_class 0: all of it). `embed(split, indices, desc)` returns feature rows."""
    picks = choose_gallery(train.labels, per_class, seed)
    features = embed(train, picks, "embedding the gallery")
    return {"features": features, "labels": torch.as_tensor(train.labels[picks], device=features.device),
            "paths": [str(Path(train.paths[i]).resolve()) for i in picks]}


@torch.no_grad()
def embed_and_score(model, splits, gallery, embed, method, k, seed):
    """The evaluation core, shared by validation during training and by evaluate: embed every
    split of {name: split} once and score it against the gallery ({features, labels}: from
    embed_gallery, or a stored one). A split given as (features, labels) is scored unembedded:
    other images are then evaluated without the training or validation images. Returns
    {name: ScoredSplit}."""
    scored = {}
    for name, split in splits.items():
        split_features, labels = split if isinstance(split, tuple) else (embed(split, None, f"embedding {split.name}"),
                                                                          split.labels)
        if not torch.isfinite(split_features).all():
            raise ValueError("the model's outputs became non-finite (the weights diverged); lower --lr or try "
                             "--no-amp")
        scored[name] = score_split(model, split_features, labels, gallery, method, k, seed)
    return scored


def embedder(model, how):
    """embed(split, indices, desc) for embed_gallery and embed_and_score: embed_images as `how` says."""
    return lambda split, indices, desc: embed_images(model, split, how, indices, desc)
