"""Train every loss on the same split, seed, image size and epoch budget, and compare them by
the same image-level metrics. Writes PROJECT/results/comparison.md.

    python compare.py --project runs/compare --data DATA [train.py flags, e.g. --epochs 5]

Each loss trains into PROJECT/<loss>/ with train.py (which evaluates its default classifier);
the embedding losses are then scored by predict.py with the other classifiers too.
"""
import csv
import json
import subprocess
import sys
from pathlib import Path

from cli import ArgumentParser

CLASSIFIERS = {"bce": ["gallery", "knn", "prototype"], "contrastive": ["knn", "prototype", "gallery"],
               "triplet": ["knn", "prototype", "gallery"], "ce": ["direct"]}


def run(*args):
    print("$", " ".join(map(str, args)), flush=True)
    if subprocess.run([sys.executable, *map(str, args)], cwd=Path(__file__).parent).returncode != 0:
        sys.exit(f"compare.py: error: {args[0]} failed (its message is above)")


def main():
    parser = ArgumentParser("compare.py", description=__doc__)
    parser.add_argument("--project", required=True, help="folder for one sub-project per loss and the comparison")
    parser.add_argument("--data", required=True, help="split folder made by to_subdirectories.py")
    parser.add_argument("--losses", nargs="+", default=list(CLASSIFIERS), choices=list(CLASSIFIERS),
                        help="losses to train (default: all four)")
    args, train_flags = parser.parse_known_args()
    project, rows = Path(args.project), []
    for loss in args.losses:
        run("train.py", "--project", project / loss, "--data", args.data, "--loss", loss, *train_flags)
        history = list(csv.DictReader(open(project / loss / "outputs" / "history.csv")))
        seconds = sum(float(row["seconds"]) for row in history)
        default = json.loads((project / loss / "results" / "metrics.json").read_text())
        for classify in CLASSIFIERS[loss]:
            if classify == default["classify"]:
                metrics = default
            else:
                out = project / loss / f"results-{classify}"
                run("predict.py", "--project", project / loss, "--data", args.data, "--classify", classify,
                    "--out", out, "--save-every", "1000000")
                metrics = json.loads((out / "metrics.json").read_text())
            rows.append((loss, classify, metrics, seconds, len(history)))

    lines = [f"Data: `{args.data}`; train.py flags: `{' '.join(train_flags) or '(defaults)'}`\n",
             "| loss | classifier | test AUC (95% CI) | balanced acc. | sensitivity | specificity | pair acc. | training time |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for loss, classify, m, seconds, epochs in rows:
        lines.append(f"| {loss} | {classify} | {m['test_auc']:.3f} ({m['test_auc_ci_low']:.3f}-{m['test_auc_ci_high']:.3f}) "
                     f"| {m['test_balanced_accuracy']:.3f} | {m['test_sensitivity']:.3f} | {m['test_specificity']:.3f} "
                     f"| {m['test_pair_accuracy']:.3f} | {seconds:.0f} s ({epochs} epochs) |")
    (project / "results").mkdir(parents=True, exist_ok=True)
    (project / "results" / "comparison.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwrote {project / 'results' / 'comparison.md'}")


if __name__ == "__main__":
    main()
