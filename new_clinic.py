"""A model trained at one clinic meets another: how much do k labelled images per class of the
new clinic help, and which way of using them helps most? Nothing is retrained: the images either
become the Siamese model's gallery (setting its threshold and calibration, as predict.py
--gallery does) or fit a logistic regression on a model's embeddings (the probe score).

    python new_clinic.py --siamese runs/ham-2ep/bce-transfer-seed0 --classifier runs/ham-2ep/ce-transfer-seed0 \\
                         --clinic data/isic2017 --out runs/new_clinic

k images per class are drawn from the clinic's training split (--draws times, seeded); every way
is scored on the clinic's test split: ROC AUC, and the ECE of its calibrated probability. Rows:
    siamese, own gallery      the project's gallery.pt: its training gallery, threshold and map
    siamese, clinic gallery   the k + k images as the gallery (score and k as trained), map by cross-fitting
    siamese, probe            a logistic regression on the Siamese embeddings of the k + k images
    classifier, own map       the plain classifier's output through its project's gallery.pt map
    classifier, refitted map  the same output, its map refitted on the k + k images
    classifier, probe         a logistic regression on the classifier's embeddings of the k + k images
Writes OUT/new_clinic.md (mean ± sd over the draws) and OUT/new_clinic.png (AUC against k).
"""
import json
from pathlib import Path

import numpy as np
import torch

from calibration import calibrated, calibration_metrics, fit_calibration
from checkpoints import best_path, gallery_path, load_checkpoint, load_gallery
from cli import one_line_errors
from config import make_parser
from dataset import load_split
from devices import pick_device
from files import WeightsError, write_text_atomic
from gallery import feature_width, validation_scores
from metrics import auc_or_nan
from plots import plot_shots
from scoring import Embedding, embed_images, score_images


def embedded_model(project, clinic, device):
    """(model, config, own gallery, {train, test}: (features, labels)) of a project on the clinic."""
    checkpoint = best_path(project)
    model, config, _ = load_checkpoint(checkpoint)
    model.to(device).eval()
    gallery, problem = load_gallery(checkpoint, feature_width(model, config, device))
    if problem:
        raise WeightsError(f"{gallery_path(checkpoint)}: {problem}; evaluate {project} on its own data again "
                           f"(predict.py) to write it")
    splits = {}
    for name in ("train", "test"):
        split = load_split(clinic, name)
        splits[name] = (embed_images(model, split, Embedding(config.image_size, 64, device, tta=config.tta),
                                     desc=f"embedding {name}"), split.labels)
    return model, config, gallery, splits


def draw(labels, shots, rng):
    """k indices of each class, without replacement."""
    return np.concatenate([rng.choice(np.flatnonzero(labels == c), shots, replace=False) for c in (0, 1)])


def result(labels, scores, calibration):
    return {"auc": auc_or_nan(labels, scores), "ece": calibration_metrics(labels, calibrated(calibration, scores))["ece"]}


def shot_results(model, config, features, labels, test_features, test_labels, method, seed):
    """{way: result} of one draw (features, labels: its k + k images) for one model and score."""
    gallery = {"features": features, "labels": torch.as_tensor(labels, device=features.device), "cross_fitted": True}
    scores = score_images(model, test_features, features, gallery["labels"], method, config.k).cpu().numpy()
    calibration = fit_calibration(validation_scores(model, method, config.k, gallery, features, seed), labels)
    return result(test_labels, scores, calibration)


def parse_args(argv=None):
    parser = make_parser("new_clinic.py", __doc__, ("device", "out"), required=("out",),
                         helps={"out": "folder for new_clinic.md, .json and .png"})
    parser.add_argument("--siamese", required=True, help="project of a --loss bce model trained elsewhere")
    parser.add_argument("--classifier", required=True, help="project of a --loss ce model trained on the same data")
    parser.add_argument("--clinic", required=True,
                        help="the new clinic's split folder (train_data to draw from, test_data)")
    parser.add_argument("--shots", type=int, nargs="+", default=[5, 10, 20, 50], help="labelled images per class")
    parser.add_argument("--draws", type=int, default=20, help="draws of the k images for each k (default 20)")
    return parser.parse_args(argv)


@torch.no_grad()
def model_rows(name, model, config, gallery, splits, args):
    """{way: {k: [result of each draw]}} of one model: its own gallery (or map), and for each k the
    k labelled images per class as a probe, as the gallery (Siamese) or refitting the map."""
    device = next(model.parameters()).device
    (train, train_labels), (test, test_labels) = splits["train"], splits["test"]
    own = "direct" if name == "classifier" else config.score
    own_scores = score_images(model, test, gallery["features"].to(device), gallery["labels"].to(device), own,
                              config.k).cpu().numpy()
    rows = {f"{name}, own {'map' if name == 'classifier' else 'gallery'}":
            {k: [result(test_labels, own_scores, gallery["calibration"])] for k in args.shots}}
    for k in args.shots:
        rng = np.random.default_rng(k)  # the same draws for both models
        for d in range(args.draws):
            picks = draw(train_labels, k, rng)
            features, labels = train[picks], train_labels[picks]
            ways = {"probe": shot_results(model, config, features, labels, test, test_labels, "probe", d)}
            if name == "siamese":
                ways["clinic gallery"] = shot_results(model, config, features, labels, test, test_labels,
                                                      config.score, d)
            else:
                refitted = fit_calibration(model.malignant_probability(features).cpu().numpy(), labels)
                ways["refitted map"] = result(test_labels, own_scores, refitted)
            for way, found in ways.items():
                rows.setdefault(f"{name}, {way}", {}).setdefault(k, []).append(found)
    return rows


def main(argv=None):
    args = parse_args(argv)
    with one_line_errors("new_clinic.py"):
        device = pick_device(args.device)
        rows = {}
        for name, project in (("siamese", args.siamese), ("classifier", args.classifier)):
            rows |= model_rows(name, *embedded_model(project, args.clinic, device), args)
    summary = {row: {k: {m: (float(np.mean([r[m] for r in runs])), float(np.std([r[m] for r in runs])))
                         for m in ("auc", "ece")} for k, runs in by_k.items()} for row, by_k in rows.items()}
    lines = [f"Clinic `{args.clinic}` (test split), models `{args.siamese}` and `{args.classifier}`; k images per "
             f"class from its training split, {args.draws} draws each: test AUC / ECE, mean ± sd\n",
             f"| way | {' | '.join(f'k = {k}' for k in args.shots)} |", "| --- |" + " --- |" * len(args.shots)]
    for row, by_k in summary.items():
        lines.append(f"| {row} | " + " | ".join(f"{by_k[k]['auc'][0]:.3f} ± {by_k[k]['auc'][1]:.3f} / "
                                                f"{by_k[k]['ece'][0]:.3f}" for k in args.shots) + " |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "new_clinic.md", "\n".join(lines) + "\n")
    write_text_atomic(out / "new_clinic.json", json.dumps(summary, indent=2) + "\n")
    plot_shots(summary, args.shots, out / "new_clinic.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
