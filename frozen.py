"""Baseline rows with no fine-tuning: a backbone's frozen ImageNet features, scored by
scikit-learn's logistic regression and by k-NN, both fitted on the training split with their one
setting (C, k) chosen on validation. A fine-tuned model has to beat these to be worth its time.

    python frozen.py --data data/isic2017 --backbone efficientnet_lite0 --image-size 224

Prints validation and test AUC (95% bootstrap interval) of each and writes them to --out as JSON.
"""
import json
from pathlib import Path

import numpy as np
import torch
from sklearn.neighbors import KNeighborsClassifier

from cli import one_line_errors
from config import at_least, check_flags, make_parser
from dataset import has_split, load_split
from files import file_problem, write_text_atomic
from images import attach_cache
from metrics import auc_or_nan, bootstrap_auc
from devices import pick_device
from modules import ImageClassifier
from scoring import Embedding, embed_images, logistic_probe

# The one setting each is allowed, chosen on validation.
LOGISTIC_C = (0.001, 0.01, 0.1, 1.0)  # inverse L2 strength on standardised features
KNN_K = (5, 10, 25, 50)


def knn(k):
    return KNeighborsClassifier(n_neighbors=k, metric="cosine", weights="distance")


BASELINES = {"logistic regression": (logistic_probe, "C", LOGISTIC_C), "k-NN": (knn, "k", KNN_K)}


def fit_on_validation(make, settings, train, validation):
    """(fitted model, its setting): of `settings`, the one with the highest validation AUC."""
    fitted = [(make(value).fit(*train), value) for value in settings if make is not knn or value <= len(train[1])]
    return max(fitted, key=lambda pair: auc_or_nan(validation[1], pair[0].predict_proba(validation[0])[:, 1]))


FROZEN_FLAGS = ("data", "backbone", "features", "weights", "image_size", "benign_limit", "batch_size", "workers",
                "cache", "device", "out")


def parse_args(argv=None):
    return make_parser("frozen.py", __doc__, FROZEN_FLAGS, required=("data",),
                       defaults={"backbone": "efficientnet_lite0", "features": "pooled", "image_size": 224,
                                 "benign_limit": [0], "batch_size": 64, "workers": 2},
                       helps={"backbone": "the frozen network", "weights": "imagenet, none (random: a floor), or "
                                                                           "a .pth path",
                              "benign_limit": "cap on benign training images (a seeded subset, as train.py "
                                              "--benign-limit); 0 = all",
                              "batch_size": "images per embedding batch", "out": "JSON file for the results "
                                                                                 "(default: print only)"}
                       ).parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    with one_line_errors("frozen.py"):
        return run(args)


def embed_splits(args):
    """{split: (features, labels)} of every split, embedded once by the frozen network."""
    if not Path(args.data).is_dir():
        raise ValueError(f"--data {args.data}: no such folder; make it with to_subdirectories.py")
    problem = args.out and file_problem(args.out)
    if problem:
        raise ValueError(f"--out {args.out}: {problem}")
    check_flags(args, FROZEN_FLAGS, rules={"batch_size": at_least(1)})
    device = pick_device(args.device)
    model = ImageClassifier(args.weights, args.backbone, args.features).to(device).eval()
    names = ["train", "validation"] + (["test"] if has_split(args.data, "test") else [])
    splits = {name: load_split(args.data, name, args.benign_limit[0] if name == "train" else 0, 0,
                               max(1, args.workers)) for name in names}
    features = {}
    for name, split in splits.items():
        if args.cache:
            attach_cache(split, args.cache, args.image_size, args.workers)
        rows = embed_images(model, split, Embedding(args.image_size, args.batch_size, device, args.workers, amp=False),
                            desc=f"embedding {name}")
        features[name] = (rows.cpu().numpy(), np.asarray(split.labels))
    return features


def run(args):
    """Embed every split once with the frozen network, fit each baseline, print and write its rows."""
    features = embed_splits(args)
    names = list(features)
    results = {"data": str(Path(args.data).resolve()), "backbone": args.backbone, "features": args.features,
               "weights": args.weights, "image_size": args.image_size, "benign_limit": args.benign_limit[0], "rows": {}}
    print(f"\nfrozen {args.backbone} ({args.weights} weights, {args.features} features, {args.image_size} px)")
    for baseline, (make, setting, values) in BASELINES.items():
        fitted, chosen = fit_on_validation(make, values, features["train"], features["validation"])
        row = {setting: chosen}
        for name in names[1:]:
            x, y = features[name]
            scores = fitted.predict_proba(x)[:, 1]
            low, high = bootstrap_auc(y, scores)
            row[name] = {"auc": auc_or_nan(y, scores), "auc_ci_low": low, "auc_ci_high": high}
        results["rows"][baseline] = row
        shown = "  ".join(f"{name} AUC {row[name]['auc']:.3f} ({row[name]['auc_ci_low']:.3f}-"
                          f"{row[name]['auc_ci_high']:.3f})" for name in names[1:])
        print(f"  {baseline:<20} {setting} = {chosen:<6} {shown}")
    if args.out:
        write_text_atomic(args.out, json.dumps(results, indent=2) + "\n")
        print(f"results: {args.out}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
