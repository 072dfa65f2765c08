"""compare.py run for real on the tiny synthetic split: one table row per run and score, results
reused only when made with the same flags, paired differences from the baseline or from another
project's twin runs, and the flags that would make a row lie refused."""
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

import compare
from helpers import ROOT, SUBPROCESS_ENV, TINY, tiny, write_scores_csv
from calibration import expected_calibration_error
from metrics import auc_or_nan, paired_auc_difference

ONE_EPOCH = tiny(1)  # four runs: one epoch each is enough to pair them


def test_compare_trains_each_run_and_writes_one_table(tiny_data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # paths resolve against the caller's folder, not the repository's
    compare.main(["--project", "cmp", "--data", str(tiny_data_dir), "--runs", "bce:study", *TINY])
    table = (tmp_path / "cmp" / "results" / "comparison.md").read_text()
    assert "| bce | study | 0 | gallery |" in table and "| bce | study | 0 | knn |" in table  # one row per score
    assert (tmp_path / "cmp" / "bce-study-seed0" / "outputs" / "best.pth").is_file()
    capsys.readouterr()

    compare.main(["--project", "cmp", "--data", str(tiny_data_dir), "--runs", "bce:study", *TINY])  # reused
    assert "$ " not in capsys.readouterr().out  # nothing trained again
    other = [*TINY[:TINY.index("--image-size") + 1], "48", *TINY[TINY.index("--image-size") + 2:]]
    with pytest.raises(SystemExit, match=r"was trained with other settings \(image_size 32, not 48\)"):
        compare.main(["--project", "cmp", "--data", str(tiny_data_dir), "--runs", "bce:study", *other])


def paired_row(table, loss, score):
    return next(line for line in table.split("Paired AUC difference")[1].splitlines()
                if line.startswith(f"| {loss} | study | {score} |"))


def test_compare_reports_each_row_paired_with_the_baseline_and_with_its_twin_elsewhere(tiny_data_dir, tmp_path,
                                                                                       monkeypatch):
    monkeypatch.chdir(tmp_path)
    compare.main(["--project", "cmp", "--data", str(tiny_data_dir), "--runs", "bce:study", "ce:study",
                  "--seeds", "0", "1", *ONE_EPOCH])
    table = (tmp_path / "cmp" / "results" / "comparison.md").read_text()
    assert "from ce:study (its own score)" in table
    # the gallery row against the classifier's own score, recomputed from the scores.csv files:
    # per seed, and pooled over both seeds
    scores = {(loss, seed): compare.read_run_scores(tmp_path / "cmp" / f"{loss}-study-seed{seed}")
              for loss in ("bce", "ce") for seed in (0, 1)}
    labels = scores["bce", 0][1]
    assert scores["bce", 0][0] == scores["ce", 1][0]
    per_seed = [compare.signed(*paired_auc_difference(labels, scores["bce", s][2]["gallery"], scores["ce", s][2]["direct"]))
                for s in (0, 1)]
    pooled = compare.signed(*paired_auc_difference(labels, np.stack([scores["bce", s][2]["gallery"] for s in (0, 1)]),
                                                   np.stack([scores["ce", s][2]["direct"] for s in (0, 1)])))
    assert paired_row(table, "bce", "gallery") == f"| bce | study | gallery | {' | '.join(per_seed)} | {pooled} |"
    assert "Mean ± standard deviation over the 2 seeds" in table
    calibrated = [line for line in table.splitlines() if line.startswith("| bce | study | 0 | gallery | 0.")]
    assert len(calibrated) == 2  # the AUC row and the calibration row of the run's own score
    assert "| ce | study | direct |" not in table.split("Paired AUC difference")[1]  # not with itself

    # the same runs elsewhere (reused, not trained again): every twin differs by exactly zero
    shutil.copytree(tmp_path / "cmp", tmp_path / "twin")
    compare.main(["--project", "twin", "--data", str(tiny_data_dir), "--runs", "bce:study", "ce:study",
                  "--seeds", "0", "1", "--against", "cmp", *ONE_EPOCH])
    table = (tmp_path / "twin" / "results" / "comparison.md").read_text()
    assert "from ce:study (its own score)" in table and "from the same run in cmp" in table
    table = "Paired AUC difference" + table.split("Paired AUC difference")[2]  # the table against the twins
    zero = compare.signed(0.0, 0.0, 0.0)
    assert paired_row(table, "bce", "gallery") == f"| bce | study | gallery | {zero} | {zero} | {zero} |"
    assert paired_row(table, "ce", "direct") == f"| ce | study | direct | {zero} | {zero} | {zero} |"


@pytest.mark.parametrize("argv, message", [
    (["--runs", "bce"], "each is LOSS:RECIPE"),
    (["--runs", "bce:nope"], "each is LOSS:RECIPE"),
    (["--losses", "bce", "--recipe", "tuned"], "--recipe: set by compare.py"),
    (["--losses", "bce", "--seed=3"], "--seed=3: set by compare.py"),
    (["--seeds", "0", "0"], "must not repeat"),
    (["--runs", "bce:study", "--baseline", "ce:study"], "--baseline ce:study: not one of the runs"),
    (["--runs", "bce:study", "--against", "nowhere"], "--against nowhere: no compare.py results there"),
    (["--seeds", "0", "1", "2", "--ensemble", "2"], "--ensemble 2: takes the 3 --seeds 2 at a time"),
    (["--seeds", "0", "1", "--ensemble", "1"], "--ensemble 1: takes the 2 --seeds 1 at a time"),
])
def test_compare_refuses_what_would_make_its_table_lie(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        compare.main(["--project", str(tmp_path / "p"), "--data", str(tmp_path), *argv])
    assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "p")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])  # Ctrl-C in a terminal, kill PID
def test_a_signal_to_compare_reaches_its_train_py_which_saves_and_the_next_compare_resumes(signum, tiny_data_dir,
                                                                                           tmp_path):
    argv = [sys.executable, "compare.py", "--project", str(tmp_path / "cmp"), "--data", str(tiny_data_dir),
            "--runs", "bce:study", *tiny(8)]
    compare_run = subprocess.Popen(argv, cwd=ROOT, env=SUBPROCESS_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
    run = tmp_path / "cmp" / "bce-study-seed0"
    for line in compare_run.stdout:  # train.py's first epoch line: it is training now
        if line.startswith("epoch   1/8"):
            break
    holder = int((run / ".lock").read_text().strip())  # the train.py process holding the project
    compare_run.send_signal(signum)
    out, err = compare_run.communicate(timeout=120)
    assert compare_run.returncode == 128 + signum
    assert err.strip().splitlines()[-1] == (
        f"compare.py: stopped by {signal.Signals(signum).name} while {run} trained; the runs done so far are kept, "
        f"and its last.pth where train.py saved one: run the same compare.py command again to continue where it "
        f"stopped")
    assert "Traceback" not in err and (run / "outputs" / "last.pth").is_file()
    assert not list((run / "outputs").glob(".*.tmp-*"))  # last.pth was written whole
    with pytest.raises(ProcessLookupError):
        os.kill(holder, 0)  # no train.py outlives compare.py
    if signum == signal.SIGTERM:
        return
    again = subprocess.run(argv, cwd=ROOT, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    resumed = next(line for line in again.stdout.splitlines() if line.startswith("$ train.py"))
    assert "--resume" in resumed and "--save-every 5" in resumed  # the flags last.pth does not keep, too
    assert "resuming" in again.stdout
    assert (run / "results" / "metrics.json").is_file()


def test_an_ensemble_averages_its_members_probabilities_and_is_paired_with_each(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 100)
    images = [f"{i}.jpg" for i in range(200)]
    members = [1 / (1 + np.exp(-(labels + rng.normal(0, 1, 200)))) for _ in range(4)]  # independent errors
    classifiers = [1 / (1 + np.exp(-(labels + rng.normal(0, 1.5, 200)))) for _ in range(4)]
    for seed, (member, classifier) in enumerate(zip(members, classifiers)):
        write_scores_csv(tmp_path / f"bce-study-seed{seed}", images, labels, member, power=1 + 4 * (seed % 2))
        write_scores_csv(tmp_path / f"ce-study-seed{seed}", images, labels, classifier)
    args = compare.parse_args(["--project", str(tmp_path), "--data", str(tmp_path), "--runs", "bce:study",
                               "ce:study", "--seeds", "0", "1", "2", "3", "--ensemble", "2"])[0]
    lines = compare.ensemble_lines(args)
    rows = [line for line in lines if line.startswith("| bce | study |")]
    assert [row.split(" | ")[2] for row in rows] == ["0 1", "2 3", "all 2 ensembles"]
    assert "ensemble minus ce:study's ensemble |" in lines[3]
    first = (members[0] + members[1]) / 2  # the mean of the probabilities, not of the raw scores:
    raw_mean = members[0] + members[1] ** 5
    assert f"{auc_or_nan(labels, first):.3f}" != f"{auc_or_nan(labels, raw_mean):.3f}"
    assert rows[0].split(" | ")[3].startswith(f"{auc_or_nan(labels, first):.3f} (")
    each = [paired_auc_difference(labels, first, m) for m in members[:2]]
    assert rows[0].split(" | ")[6] == ", ".join(compare.signed(*difference) for difference in each)
    assert all(difference > 0 for difference, _, _ in each)  # the members' independent noise averages out
    assert rows[0].split(" | ")[4] == f"{expected_calibration_error(labels, first):.3f}"
    assert rows[0].split(" | ")[5] == f"{auc_or_nan(labels, members[0]):.3f}, {auc_or_nan(labels, members[1]):.3f}"
    minus_mean = paired_auc_difference(labels, np.stack([first, first]), np.stack(members[:2]))
    assert rows[0].split(" | ")[7] == compare.signed(*minus_mean)
    versus = (classifiers[0] + classifiers[1]) / 2  # the classifiers' ensemble of the same seeds
    assert rows[0].endswith(f"| {compare.signed(*paired_auc_difference(labels, first, versus))} |")
    second = (members[2] + members[3]) / 2
    pooled = paired_auc_difference(labels, np.stack([first, first, second, second]), np.stack(members))
    against = paired_auc_difference(labels, np.stack([first, second]),
                                    np.stack([versus, (classifiers[2] + classifiers[3]) / 2]))
    assert rows[2].endswith(f"| {compare.signed(*pooled)} | {compare.signed(*against)} |")
    assert [line for line in lines if line.startswith("| ce | study |")][0].endswith(" |  |")  # not with itself

    write_scores_csv(tmp_path / "other" / "bce-study-seed0", images[::-1], labels, members[0])
    write_scores_csv(tmp_path / "other" / "bce-study-seed1", images, labels, members[1])
    args.project, args.seeds, args.pairs = str(tmp_path / "other"), [0, 1], [("bce", "study")]
    with pytest.raises(SystemExit, match=r"compare.py: error: .*bce-study-seed1/results/scores.csv: scores other "
                                         r"images than .*bce-study-seed0/results/scores.csv"):
        compare.ensemble_lines(args)


def test_an_ensemble_is_paired_with_the_same_seeds_ensemble_in_against(tmp_path):
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1], 60)
    images = [f"{i}.jpg" for i in range(120)]
    runs = {(project, seed): 1 / (1 + np.exp(-(labels + rng.normal(0, 1, 120))))
            for project in ("extra", "plain") for seed in (0, 1)}
    for (project, seed), probabilities in runs.items():
        write_scores_csv(tmp_path / project / f"bce-study-seed{seed}", images, labels, probabilities)
    (tmp_path / "plain" / "results").mkdir()
    (tmp_path / "plain" / "results" / "comparison.md").write_text("")  # what --against looks for
    args = compare.parse_args(["--project", str(tmp_path / "extra"), "--data", str(tmp_path), "--runs", "bce:study",
                               "--seeds", "0", "1", "--ensemble", "2", "--against", str(tmp_path / "plain")])[0]
    lines = compare.ensemble_lines(args)
    assert lines[3].endswith(f"| ensemble minus the same ensemble in {tmp_path / 'plain'} |")
    ours, theirs = [(runs[project, 0] + runs[project, 1]) / 2 for project in ("extra", "plain")]
    row = next(line for line in lines if line.startswith("| bce | study | 0 1 |"))
    assert row.endswith(f"|  | {compare.signed(*paired_auc_difference(labels, ours, theirs))} |")  # no ce baseline

    twin = tmp_path / "plain" / "bce-study-seed1"
    shutil.rmtree(twin)  # its twin scored other images: refused
    write_scores_csv(twin, images[::-1], labels[::-1], runs["plain", 1][::-1])
    write_scores_csv(tmp_path / "plain" / "reordered", images[::-1], labels[::-1], runs["plain", 0][::-1])
    (tmp_path / "plain" / "reordered" / "results" / "scores.csv").replace(tmp_path / "plain" / "bce-study-seed0" /
                                                                           "results" / "scores.csv")
    with pytest.raises(SystemExit, match=r"compare.py: error: the ensemble of bce-study seeds 0 1 and one it is paired "
                                         r"with were scored on different images"):
        compare.ensemble_lines(args)
    (twin / "results" / "scores.csv").unlink()  # the twin is incomplete: no cell
    assert next(line for line in compare.ensemble_lines(args) if line.startswith("| bce | study | 0 1 |")).endswith(
        "|  |  |")
