"""Train every loss under each recipe and seed on the same split, image size and epoch budget, and
compare them by the same image-level metrics. Writes PROJECT/results/comparison.md.

    python compare.py --project runs/compare --data DATA [--recipes study tuned] [--seeds 0 1 2]
                      [--losses bce ce] [--baseline ce:transfer] [--against runs/other] [--ensemble 3]
                      [train.py flags, e.g. --epochs 8 --image-size 96]

Each run trains into PROJECT/<loss>-<recipe>-seed<seed>/ with train.py, which evaluates the test
split (or the validation split when DATA has none) with the loss's default image-level score and
every other score the model supports from the same embeddings. A run whose
results/metrics.json exists is not trained again, and one stopped while it trained (Ctrl-C or kill
of compare.py, passed on to its train.py, which saves last.pth) resumes from its last.pth, so an
interrupted benchmark continues where it stopped. With several seeds a second table gives each row's mean and standard deviation.

Two models scored on the same images are compared by their paired difference: a third table gives
every row's AUC minus the baseline's (--baseline, default the ce run: the plain classifier), per
seed and averaged over the seeds, each with a 95 % interval from 1,000 resamples of the images
that score both models (metrics.paired_auc_difference). With --against OTHER_PROJECT (another
compare.py project on the same data, e.g. trained without --extra-train) a fourth table compares
every row with the same loss, recipe, seed and score there. With --ensemble K a last table scores
ensembles of K seeds' runs (the mean of their calibrated P(malignant)), each paired with its members.
"""
import csv
import json
import signal
import statistics
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np

from checkpoints import last_path
from config import CONFIG_FILE, RECIPES, make_parser, read_config
from ensemble import ensemble_of, ensemble_statistics
from files import folder_problem, write_text_atomic
from losses import LOSSES
from metrics import paired_auc_difference, signed
from scores_csv import read_scores
from train import make_config, parse_args as train_args


class Stopped(Exception):
    """compare.py was asked to stop (SIGINT, SIGTERM) while one of its runs trained."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


def run(script, *args):
    """One of this repository's scripts, run in the caller's folder: every path a user typed
    (--cache, --weights ...) means what it means to them. It runs in a session of its own, so a
    Ctrl-C in the terminal reaches compare.py alone, which passes each SIGINT or SIGTERM on to it
    once and waits: train.py saves last.pth and exits, and no run outlives compare.py."""
    print("$", script, " ".join(map(str, args)), flush=True)
    child = subprocess.Popen([sys.executable, str(Path(__file__).with_name(script)), *map(str, args)],
                             start_new_session=True)
    received = []

    def forward(signum, _frame):  # a closed terminal (SIGHUP) stops the run as kill does
        received.append(signum)
        child.send_signal(signal.SIGTERM if signum == signal.SIGHUP else signum)
    signals = ((signal.SIGINT, signal.SIGTERM, signal.SIGHUP) if threading.current_thread() is threading.main_thread()
               else ())
    previous = {s: signal.signal(s, forward) for s in signals}
    try:
        code = child.wait()
    finally:
        if child.poll() is None:  # compare.py is leaving some other way: its run leaves with it
            child.terminate()
            child.wait()
        for s, handler in previous.items():
            signal.signal(s, handler)
    if received:
        raise Stopped(received[0])
    if code != 0:
        sys.exit(f"compare.py: error: {script} failed (its message is above)")


# A row's own settings: passing one of these through to train.py would make the row lie.
ROW_FLAGS = ("--project", "--data", "--loss", "--recipe", "--seed", "--force", "--resume", "--config")


def train_and_score(folder, data, loss, recipe, seed, train_flags):
    """metrics.json of one run (train.py computes every score the model supports). Trains only when
    the run has no results yet, continues one stopped before (its last.pth), and refuses a run
    whose outputs/config.yaml holds other settings than these flags give."""
    row = [str(value) for value in ("--project", folder, "--data", data, "--loss", loss, "--recipe", recipe,
                                    "--seed", seed, *train_flags)]
    wanted, saved = make_config(train_args(row)).as_dict(), folder / "outputs" / CONFIG_FILE
    metrics_path = folder / "results" / "metrics.json"
    if saved.is_file():
        try:
            made_with = read_config(saved).as_dict()
        except ValueError as error:
            sys.exit(f"compare.py: error: {error}")
        changed = [f"{key} {made_with[key]!r}, not {wanted[key]!r}" for key in wanted if made_with[key] != wanted[key]]
        if changed:
            sys.exit(f"compare.py: error: {folder} was trained with other settings ({'; '.join(changed[:3])}); "
                     f"choose another --project, or delete {folder} to train it again")
    elif metrics_path.exists():
        sys.exit(f"compare.py: error: {folder} has results but no {saved} (the settings that made them); choose "
                 f"another --project, or delete {folder} to train it again")
    if not metrics_path.exists():  # stopped earlier (its last.pth): continue it, with the flags it does not keep
        run("train.py", *row, "--resume" if last_path(folder).is_file() and saved.is_file()
            else "--force")
    return json.loads(metrics_path.read_text())


def rows_of(metrics, history):
    """One table row per image-level score: (score, {auc, ci, balanced accuracy, ...})."""
    prefix = metrics["evaluated_split"] + "_"
    main = {key.removeprefix(prefix): value for key, value in metrics.items() if key.startswith(prefix)}
    main["retrieval"] = metrics.get("retrieval", {})
    rows = [(metrics["score"], main), *metrics["other_scores"].items()]
    seconds = sum(float(row["seconds"]) for row in history)
    return [(name, m, seconds, len(history)) for name, m in rows]


def read_run_scores(folder, probabilities=False):
    """scores_csv.read_scores of one run's results/scores.csv; one that cannot be read stops compare.py."""
    try:
        return read_scores(folder / "results" / "scores.csv", probabilities)
    except ValueError as error:
        sys.exit(f"compare.py: error: {error}; delete {folder} to train that run again")


def calibration_lines(table):
    """Each run's headline score: ECE and Brier score of its raw score and of its calibrated
    P(malignant), and the share of same-class images among the 5 nearest gallery images by each
    similarity (metrics.json; '-' for results written before they were measured)."""
    lines = ["", "P(malignant) and the nearest gallery images, each run's own score (ECE over 10 bins of equal counts; "
                 "nearest 5: the share of the query's class, benign / melanoma):", "",
             "| loss | recipe | seed | score | ECE raw | ECE calibrated | Brier raw | Brier calibrated | nearest 5, "
             "cosine | nearest 5, head |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    headline = {}
    for loss, recipe, seed, score, m, *_ in table:  # each run's first row is its own score
        headline.setdefault((loss, recipe, seed), (score, m))
    for (loss, recipe, seed), (score, m) in headline.items():
        if "ece" not in m:  # written before calibration was measured
            continue
        near = [f"{r['precision_at_5_benign']:.2f} / {r['precision_at_5_malignant']:.2f}" if r else "-"
                for r in (m.get("retrieval", {}).get(name) for name in ("cosine", "head"))]
        lines.append(f"| {loss} | {recipe} | {seed} | {score} | {m['raw_ece']:.3f} | {m['ece']:.3f} | "
                     f"{m['raw_brier']:.3f} | {m['brier']:.3f} | {' | '.join(near)} |")
    return lines


def paired_lines(runs, seeds, baseline_of, baseline_name):
    """The paired-difference table: each (loss, recipe, score) row's AUC minus its baseline's on
    the same images, per seed and pooled over the seeds. `runs`: {(loss, recipe, seed): (images,
    labels, {score: values})}; baseline_of(loss, recipe, seed, score) gives the baseline's
    (images, labels, values), or None for the baseline itself."""
    lines = ["", f"Paired AUC difference from {baseline_name} on the same images (95 % interval over 1,000 "
                 f"resamples of the images, each scoring both models; pooled: the mean over the seeds):", "",
             f"| loss | recipe | score | {' | '.join(f'seed {seed}' for seed in seeds)} | pooled over seeds |",
             "| --- | --- | --- |" + " --- |" * (len(seeds) + 1)]
    rows = dict.fromkeys((loss, recipe, score) for (loss, recipe, _), (*_, scores) in runs.items() for score in scores)
    for loss, recipe, score in rows:
        pairs = [(runs[loss, recipe, seed], baseline_of(loss, recipe, seed, score)) for seed in seeds]
        if any(baseline is None for _, baseline in pairs):
            continue
        for (images, _, _), (baseline_images, _, _) in pairs:
            if images != baseline_images:
                sys.exit(f"compare.py: error: {loss}-{recipe} and {baseline_name} were scored on different images; "
                         f"compare runs evaluated on the same --data")
        labels = pairs[0][0][1]
        scores = np.stack([run[2][score] for run, _ in pairs])
        baseline = np.stack([values for _, (_, _, values) in pairs])
        cells = [signed(*paired_auc_difference(labels, a, b)) for a, b in zip(scores, baseline)]
        lines.append(f"| {loss} | {recipe} | {score} | {' | '.join(cells)} | "
                     f"{signed(*paired_auc_difference(labels, scores, baseline))} |")
    return lines


def project_ensembles(project, pairs, groups):
    """{(loss, recipe): [ensemble.ensemble_of each group of seeds' runs]} of a project, leaving out a
    loss and recipe whose runs are not all there (an --against project may lack some)."""
    made = {}
    for loss, recipe in pairs:
        files = [[Path(project) / f"{loss}-{recipe}-seed{seed}" / "results" / "scores.csv" for seed in group]
                 for group in groups]
        if all(path.is_file() for group in files for path in group):
            try:
                made[loss, recipe] = [ensemble_of(group) for group in files]
            except ValueError as error:
                sys.exit(f"compare.py: error: {error}")
    return made


def ensemble_lines(args):
    """Ensembles of --ensemble K runs of each loss and recipe, the seeds taken K at a time in their
    order; an ensemble's P(malignant) of an image is the mean of its members'. Each ensemble's AUC
    and calibration error, its paired difference from each member and from the members' mean AUC,
    from the baseline's ensemble of the same seeds and, with --against, from the same ensemble
    there; with several ensembles, pooled over them."""
    k, baseline = args.ensemble, chosen_baseline(args)
    groups = [args.seeds[i:i + k] for i in range(0, len(args.seeds), k)]
    made = project_ensembles(args.project, args.pairs, groups)
    twins = project_ensembles(args.against, args.pairs, groups) if args.against else None
    others = [f"{baseline or 'the baseline'}'s ensemble"] + [f"the same ensemble in {args.against}"] * bool(args.against)
    lines = ["", f"Ensembles of {k} runs: the mean of the members' calibrated P(malignant), each by its own score "
                 f"(paired differences: 95 % interval over 1,000 resamples of the images; pooled: the mean over the "
                 f"members, or over the ensembles):", "",
             f"| loss | recipe | seeds | ensemble AUC (95% CI) | ECE calibrated | members' AUC | ensemble minus each "
             f"member | ensemble minus the members' mean | {' | '.join(f'ensemble minus {o}' for o in others)} |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |" + " --- |" * len(others)]
    base = tuple(baseline.split(":", 1)) if baseline else None
    for (loss, recipe), ensembles in made.items():
        versus = [made.get(base) if base != (loss, recipe) else None]  # the columns' ensembles, None for a blank
        if twins is not None:
            versus.append(twins.get((loss, recipe)))
        for i, (group, (images, labels, members, ensemble)) in enumerate(zip(groups, ensembles)):
            if any(other and other[i][0] != images for other in versus):
                sys.exit(f"compare.py: error: the ensemble of {loss}-{recipe} seeds {' '.join(map(str, group))} and "
                         f"one it is paired with were scored on different images; compare runs evaluated on the same "
                         f"--data")
            stats = ensemble_statistics(labels, members, ensemble)
            against = [signed(*paired_auc_difference(labels, ensemble, other[i][3])) if other else ""
                       for other in versus]
            lines.append(f"| {loss} | {recipe} | {' '.join(map(str, group))} | {stats['auc']:.3f} "
                         f"({stats['interval'][0]:.3f}-{stats['interval'][1]:.3f}) | {stats['ece']:.3f} | "
                         f"{', '.join(f'{auc:.3f}' for auc in stats['member_aucs'])} | "
                         f"{', '.join(signed(*difference) for difference in stats['minus_each'])} | "
                         f"{signed(*stats['minus_mean'])} | {' | '.join(against)} |")
        if len(groups) > 1:
            labels, ours = ensembles[0][1], np.stack([e for *_, e in ensembles])
            mean_of_members = paired_auc_difference(labels, np.concatenate([[e] * k for *_, e in ensembles]),
                                                    np.concatenate([members for _, _, members, _ in ensembles]))
            against = [signed(*paired_auc_difference(labels, ours, np.stack([e for *_, e in other]))) if other else ""
                       for other in versus]
            lines.append(f"| {loss} | {recipe} | all {len(groups)} ensembles | | | | | {signed(*mean_of_members)} | "
                         f"{' | '.join(against)} |")
    return lines


def parse_args(argv=None):
    """compare.py's flags, and the train.py flags it passes on to every run."""
    parser = make_parser("compare.py", __doc__, ("project", "data"), required=("project", "data"),
                         helps={"project": "folder for one sub-project per run and the comparison"})
    parser.add_argument("--losses", nargs="+", default=list(LOSSES), choices=tuple(LOSSES),
                        help="losses to train (default: all four)")
    parser.add_argument("--recipes", nargs="+", default=["study"], choices=tuple(RECIPES),
                        help="train.py --recipe values to run for every loss (default: study)")
    parser.add_argument("--runs", nargs="+", metavar="LOSS:RECIPE",
                        help="exactly these loss and recipe pairs, e.g. bce:study bce:tuned ce:tuned "
                             "(instead of every --losses x --recipes)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds to run (default: 0)")
    parser.add_argument("--baseline", metavar="LOSS:RECIPE",
                        help="the run every other is compared with on the same images (default: the first ce run)")
    parser.add_argument("--against", metavar="PROJECT",
                        help="another compare.py project on the same data: compare each row with its twin there "
                             "(same loss, recipe, seed and score) instead of with --baseline")
    parser.add_argument("--ensemble", type=int, metavar="K",
                        help="also score ensembles of K runs of each loss and recipe: the seeds taken K at a time "
                             "(--seeds 0 1 2 3 4 5 --ensemble 3: seeds 0-2 and 3-5), each ensemble paired with its "
                             "members")
    args, train_flags = parser.parse_known_args(argv)
    refused = [flag for flag in train_flags if flag.split("=")[0] in ROW_FLAGS]
    if refused:
        parser.error(f"{refused[0]}: set by compare.py for each row (--losses, --recipes, --runs, --seeds); "
                     f"drop it")
    try:
        args.pairs = run_pairs(args)
    except ValueError as error:
        parser.error(str(error))
    return args, train_flags


def run_pairs(args):
    """The (loss, recipe) pairs to run, each flag checked."""
    problem = folder_problem(args.project)
    if problem:
        raise ValueError(f"--project {args.project}: {problem}; choose another --project")
    if len(set(args.seeds)) != len(args.seeds) or (args.runs and len(set(args.runs)) != len(args.runs)):
        raise ValueError("--seeds and --runs must not repeat a value")
    pairs = [(loss, recipe) for recipe in args.recipes for loss in args.losses]
    if args.runs:
        pairs = [tuple(run.split(":", 1)) for run in args.runs]
        bad = [":".join(pair) for pair in pairs if len(pair) != 2 or pair[0] not in LOSSES or pair[1] not in RECIPES]
        if bad:
            raise ValueError(f"--runs {' '.join(bad)}: each is LOSS:RECIPE, e.g. bce:tuned")
    if args.ensemble is not None and (args.ensemble < 2 or len(args.seeds) % args.ensemble):
        raise ValueError(f"--ensemble {args.ensemble}: takes the {len(args.seeds)} --seeds {args.ensemble} at a "
                         f"time; give a K of at least 2 that divides the number of seeds")
    if args.baseline and tuple(args.baseline.split(":", 1)) not in pairs:
        raise ValueError(f"--baseline {args.baseline}: not one of the runs ({' '.join(':'.join(p) for p in pairs)})")
    if args.against and not (Path(args.against) / "results" / "comparison.md").is_file():
        raise ValueError(f"--against {args.against}: no compare.py results there (results/comparison.md); run "
                         f"compare.py with that --project first")
    return pairs


def train_all(args, train_flags):
    """(table rows, {(loss, recipe, seed): scores}, the last metrics) of every run, trained as needed."""
    table, runs, metrics = [], {}, None
    for loss, recipe in args.pairs:
        for seed in args.seeds:
            folder = Path(args.project) / f"{loss}-{recipe}-seed{seed}"
            try:
                metrics = train_and_score(folder, args.data, loss, recipe, seed, train_flags)
            except Stopped as stopped:
                print(f"compare.py: stopped by {signal.Signals(stopped.signum).name} while {folder} trained; the "
                      f"runs done so far are kept, and its last.pth where train.py saved one: run the same "
                      f"compare.py command again to continue where it stopped", file=sys.stderr)
                sys.exit(128 + stopped.signum)
            history = list(csv.DictReader(open(folder / "outputs" / "history.csv")))
            table += [(loss, recipe, seed, *row) for row in rows_of(metrics, history)]
            runs[loss, recipe, seed] = read_run_scores(folder)
    return table, runs, metrics


def results_lines(args, train_flags, table, split):
    """The comparison's first tables: every run's rows, and with several seeds their mean ± sd."""
    lines = [f"Data: `{args.data}` ({split} split); seeds {' '.join(map(str, args.seeds))}; "
             f"train.py flags: `{' '.join(train_flags) or '(defaults)'}`\n",
             f"| loss | recipe | seed | score | {split} AUC (95% CI) | balanced acc. | sensitivity | "
             f"specificity | training time |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for loss, recipe, seed, score, m, seconds, epochs in table:
        lines.append(f"| {loss} | {recipe} | {seed} | {score} | {m['auc']:.3f} ({m['auc_ci_low']:.3f}-"
                     f"{m['auc_ci_high']:.3f}) | {m['balanced_accuracy']:.3f} | {m['sensitivity']:.3f} | "
                     f"{m['specificity']:.3f} | {seconds / 60:.0f} min ({epochs} epochs) |")
    if len(args.seeds) > 1:
        lines += ["", f"Mean ± standard deviation over the {len(args.seeds)} seeds:", "",
                  f"| loss | recipe | score | {split} AUC | balanced acc. | sensitivity | specificity |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for key in dict.fromkeys((loss, recipe, score) for loss, recipe, _, score, *_ in table):
            seeds = [m for loss, recipe, _, score, m, *_ in table if (loss, recipe, score) == key]
            cells = [f"{statistics.mean(r[name] for r in seeds):.3f} ± {statistics.stdev(r[name] for r in seeds):.3f}"
                     for name in ("auc", "balanced_accuracy", "sensitivity", "specificity")]
            lines.append(f"| {' | '.join(key)} | {' | '.join(cells)} |")
    return lines


def chosen_baseline(args):
    """The run every other is paired with, as LOSS:RECIPE: --baseline, or the first ce run (None if
    there is none)."""
    return args.baseline or next((f"{loss}:{recipe}" for loss, recipe in args.pairs if loss == "ce"), None)


def difference_lines(args, runs):
    """The paired-difference tables: from --baseline (default the first ce run), and from each
    run's twin in --against."""
    lines, baseline = [], chosen_baseline(args)
    if baseline:
        base_loss, base_recipe = baseline.split(":", 1)

        def baseline_run(loss, recipe, seed, score):
            if (loss, recipe) == (base_loss, base_recipe):
                return None
            images, labels, scores = runs[base_loss, base_recipe, seed]
            return images, labels, scores[next(iter(scores))]  # its own score: scores.csv's first column
        lines += paired_lines(runs, args.seeds, baseline_run, f"{baseline} (its own score)")
    if args.against:
        def twin(loss, recipe, seed, score):
            folder = Path(args.against) / f"{loss}-{recipe}-seed{seed}"
            if not (folder / "results" / "scores.csv").is_file():
                return None
            images, labels, scores = read_run_scores(folder)
            return (images, labels, scores[score]) if score in scores else None
        lines += paired_lines(runs, args.seeds, twin, f"the same run in {args.against}")
    return lines


def main(argv=None):
    args, train_flags = parse_args(argv)
    table, runs, metrics = train_all(args, train_flags)
    lines = (results_lines(args, train_flags, table, metrics["evaluated_split"]) + calibration_lines(table)
             + difference_lines(args, runs) + (ensemble_lines(args) if args.ensemble else []))
    results = Path(args.project) / "results"
    results.mkdir(parents=True, exist_ok=True)
    write_text_atomic(results / "comparison.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwrote {results / 'comparison.md'}")


if __name__ == "__main__":
    main()
