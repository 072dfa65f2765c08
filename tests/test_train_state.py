"""train.py's saved state and how a run stops: last.pth every epoch with the whole state, --resume
equal to the uninterrupted run (after an epoch, mid-epoch, after kill -9), SIGINT and SIGTERM, a
non-finite loss, a failed (disk-full) write, one run per project (a lock), and which changed flags
--resume applies or refuses.

Training runs in-process through train.main, its test-split evaluation stubbed where it is not
the subject; a subprocess only for SIGINT to the real command line."""
import contextlib
import csv
import io
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import checkpoints
import files
import predict
import scoring
import train
from distributed import RunContext
from helpers import ROOT, SIGNALS, SUBPROCESS_ENV, assert_one_line, call_main, torch_load, train_argv

pytestmark = pytest.mark.usefixtures("single_torch_thread")
CPU_CONTEXT = RunContext(rank=0, world_size=1, device=torch.device("cpu"), outputs=Path("outputs"), workers=0)


def history_without_seconds(outputs):
    with open(Path(outputs) / "history.csv", newline="") as file:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(file)]


def assert_same_weights(path_a, path_b):
    a, b = torch_load(path_a)["model"], torch_load(path_b)["model"]
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ between {path_a} and {path_b}, e.g. {different[:3]}"


def assert_finite_weights(path):
    state = torch_load(path)["model"]
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    assert not bad, f"{path} holds non-finite tensors: {bad[:3]}"


def no_test_evaluation(*args, **kwargs):
    return {}


def patch_training_loss(mp, change):
    """The run's loss (bce, train_argv's: losses.LOSSES["bce"], which train.py builds the loss from)
    with each training step's BatchResult passed through change(result, number of the step)."""
    real, calls = train.LOSSES["bce"], []

    class Changed(real):
        def __call__(self, model, batch):
            calls.append(1)
            return change(super().__call__(model, batch), len(calls))

    mp.setitem(train.LOSSES, "bce", Changed)


def nan_loss(result):
    return result._replace(loss=result.loss * float("nan"))


# ---------------------------------------------------------------------------------------------
# last.pth and --resume


def test_last_checkpoint_is_written_every_epoch_with_the_whole_state(reference_run):
    last_saves = [(epoch, step) for name, epoch, step in reference_run.saves if name == "last.pth"]
    assert last_saves == [(1, 0), (2, 0)]
    last = torch_load(reference_run.outputs / "last.pth")  # weights_only=True: plain data
    for key in ("model", "optimizer", "scaler", "epoch", "best", "history", "rng", "config"):
        assert key in last, key
    assert last["epoch"] == 2 and len(last["history"]) == 2
    assert last["optimizer"]["state"], "optimizer moments are missing"
    assert set(last["rng"]) == {"torch", "cuda"}
    names = {p.name for p in reference_run.outputs.iterdir()}
    assert {"best.pth", "last.pth", "history.csv"} <= names
    assert not [n for n in names if "tmp" in n or n.startswith(".")], names  # no half-written leftovers


def test_run_stopped_after_epoch_1_and_resumed_equals_the_uninterrupted_run(reference_run, broken_data_dir, tmp_path,
                                                                           no_test_eval):
    project = tmp_path / "project"
    assert call_main(train.main, train_argv(project, broken_data_dir, 1)) == (0, "")
    assert torch_load(project / "outputs" / "last.pth")["epoch"] == 1
    assert call_main(train.main, train_argv(project, broken_data_dir, 2, "--resume")) == (0, "")
    assert history_without_seconds(project / "outputs") == history_without_seconds(reference_run.outputs)
    for name in ("best.pth", "last.pth"):
        assert_same_weights(project / "outputs" / name, reference_run.outputs / name)
    assert torch_load(project / "outputs" / "last.pth")["best"] == torch_load(reference_run.outputs / "last.pth")["best"]


def test_ema_validates_and_keeps_the_weights_average_and_resumes_to_the_uninterrupted_run(broken_data_dir, tmp_path,
                                                                                           monkeypatch, no_test_eval):
    """--ema: validation scores the average of the weights, best.pth keeps it, last.pth holds the
    model and the average, and a run stopped after epoch 1 and resumed equals the uninterrupted one."""
    validated, real_validate = [], train.validate

    def spy(model, *args):
        validated.append({k: v.clone() for k, v in model.state_dict().items()})
        return real_validate(model, *args)

    monkeypatch.setattr(train, "validate", spy)
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    assert call_main(train.main, train_argv(whole, broken_data_dir, 2, "--ema", "0.9")) == (0, "")
    last = torch_load(whole / "outputs" / "last.pth")
    best = torch_load(whole / "outputs" / "best.pth")
    assert last["config"]["ema"] == 0.9 and len(validated) == 2
    assert all(torch.equal(validated[1][k], last["ema"][k]) for k in last["ema"])
    assert not torch.equal(last["ema"]["backbone.conv1.weight"], last["model"]["backbone.conv1.weight"])
    assert all(torch.equal(best["model"][k], validated[best["epoch"] - 1][k]) for k in best["model"])
    assert call_main(train.main, train_argv(stopped, broken_data_dir, 1, "--ema", "0.9")) == (0, "")
    assert call_main(train.main, train_argv(stopped, broken_data_dir, 2, "--ema", "0.9", "--resume")) == (0, "")
    assert history_without_seconds(stopped / "outputs") == history_without_seconds(whole / "outputs")
    for name in ("best.pth", "last.pth"):
        assert_same_weights(stopped / "outputs" / name, whole / "outputs" / name)
    resumed = torch_load(stopped / "outputs" / "last.pth")["ema"]
    assert all(torch.equal(resumed[k], last["ema"][k]) for k in resumed)
    evaluated = checkpoints.load_checkpoint(whole / "outputs" / "last.pth")[0].state_dict()  # predict.py --checkpoint
    assert all(torch.equal(evaluated[k], last["ema"][k]) for k in evaluated)
    del last["ema"]
    torch.save(last, whole / "outputs" / "last.pth")
    code, message = call_main(train.main, train_argv(whole, broken_data_dir, 3, "--ema", "0.9", "--resume"))
    assert code == 1 and "holds none" in message and "start over with --force" in message and "\n" not in message


def test_probe_epochs_train_what_sits_on_the_backbone_then_the_whole_network(broken_data_dir, tmp_path, monkeypatch,
                                                                             no_test_eval):
    """--probe-epochs 1 of 2: after epoch 1 the backbone's weights and BatchNorm statistics are as
    built and the head has moved; after epoch 2 the backbone has moved too."""
    built, validated, real_build, real_validate = [], [], train.build_model, train.validate

    def build_spy(*args, **kwargs):
        model = real_build(*args, **kwargs)
        built.append({k: v.clone() for k, v in model.state_dict().items()})
        return model

    def validate_spy(model, *args):
        validated.append({k: v.clone() for k, v in model.state_dict().items()})
        return real_validate(model, *args)

    monkeypatch.setattr(train, "build_model", build_spy)
    monkeypatch.setattr(train, "validate", validate_spy)
    assert call_main(train.main, train_argv(tmp_path / "p", broken_data_dir, 2, "--probe-epochs", "1")) == (0, "")
    initial, probed, tuned = built[0], *validated
    backbone = [k for k in initial if k.startswith("backbone.")]
    assert all(torch.equal(probed[k], initial[k]) for k in backbone)  # running_mean and _var included
    assert any(not torch.equal(probed[k], initial[k]) for k in initial if k not in backbone)
    assert not torch.equal(tuned["backbone.conv1.weight"], initial["backbone.conv1.weight"])
    assert not torch.equal(tuned["backbone.bn1.running_mean"], initial["backbone.bn1.running_mean"])


class Killed(BaseException):
    """kill -9: nothing of train.py runs after it, no handler sees it."""


def test_a_run_killed_after_epoch_1_resumes_to_the_uninterrupted_run(reference_run, broken_data_dir, tmp_path,
                                                                     monkeypatch, no_test_eval):
    """Killed as soon as history.csv lists epoch 1, then --resume; the killed run built the
    cache, the resumed one reads it, and reference_run used none: all three train alike."""
    real_write = train.write_history

    def write_then_die(history, path):
        real_write(history, path)
        raise Killed

    project, cache = tmp_path / "project", tmp_path / "cache"
    with monkeypatch.context() as patched:
        patched.setattr(train, "write_history", write_then_die)
        with pytest.raises(Killed):
            call_main(train.main, train_argv(project, broken_data_dir, 2, "--cache", cache))
    assert torch_load(project / "outputs" / "last.pth")["epoch"] == 1
    assert call_main(train.main, train_argv(project, broken_data_dir, 2, "--resume", "--cache", cache)) == (0, "")
    assert history_without_seconds(project / "outputs") == history_without_seconds(reference_run.outputs)
    for name in ("best.pth", "last.pth"):
        assert_same_weights(project / "outputs" / name, reference_run.outputs / name)


def test_temporary_files_of_a_killed_run_do_not_survive_into_the_next(reference_run, broken_data_dir, tmp_path,
                                                                      no_test_eval):
    project = tmp_path / "project"
    shutil.copytree(reference_run.project, project)
    killed = subprocess.Popen([sys.executable, "-c", "pass"])
    killed.wait()
    stale = project / "outputs" / f".last.tmp-{killed.pid}.pth"  # kill -9 during save_atomic
    stale.write_bytes(b"PK\x03\x04 half a checkpoint")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert call_main(train.main, train_argv(project, broken_data_dir, 3, "--resume")) == (0, "")
    assert not stale.exists()
    assert f"removed 1 temporary file(s) a killed run left in {project / 'outputs'}: {stale.name}" in stdout.getvalue()


def test_last_checkpoint_is_saved_before_the_history_lists_the_epoch(broken_data_dir, tmp_path, monkeypatch,
                                                                     no_test_eval):
    """A kill between the two writes (the OOM killer) must never leave a history ahead of last.pth."""
    real_write, seen = train.write_history, []

    def write_history(history, path):
        last = Path(path).with_name("last.pth")
        seen.append((len(history), torch_load(last)["epoch"] if last.exists() else None))
        return real_write(history, path)

    monkeypatch.setattr(train, "write_history", write_history)
    assert call_main(train.main, train_argv(tmp_path / "project", broken_data_dir, 1)) == (0, "")
    assert seen == [(1, 1)]


def test_project_with_outputs_is_refused_without_resume_or_force(reference_run, broken_data_dir, no_test_eval):
    before = {p.name: p.stat().st_mtime_ns for p in reference_run.outputs.iterdir()}
    status, message = call_main(train.main, train_argv(reference_run.project, broken_data_dir, 2))
    assert status != 0
    assert_one_line(message, "train.py: error:")
    assert str(reference_run.outputs) in message and "--resume" in message and "--force" in message
    assert {p.name: p.stat().st_mtime_ns for p in reference_run.outputs.iterdir()} == before


def test_force_with_a_weights_typo_deletes_nothing(reference_run, broken_data_dir, tmp_path, no_test_eval):
    project = tmp_path / "finished"
    shutil.copytree(reference_run.project, project)
    before = {p.name: p.read_bytes() for p in (project / "outputs").iterdir()}
    status, message = call_main(train.main, train_argv(project, broken_data_dir, 2, "--force",
                                                       "--weights", tmp_path / "typo.pth"))
    assert status != 0
    assert_one_line(message, "train.py: error:")
    assert f"--weights {tmp_path / 'typo.pth'}: no such file" in message
    assert {p.name: p.read_bytes() for p in (project / "outputs").iterdir()} == before


@pytest.mark.parametrize("flag, value, saved", [("--lr", "0.05", "0.001"), ("--batch-size", "4", "8"),
                                                ("--loss", "triplet", "'bce'"), ("--image-size", "64", "32"),
                                                ("--benign-limit", "3", "[4000, 1000, 1000]")])
def test_resume_refuses_a_changed_setting_naming_the_flag(resumable, broken_data_dir, flag, value, saved,
                                                          no_test_eval):
    last = resumable / "outputs" / "last.pth"
    before = last.stat().st_mtime_ns
    status, message = call_main(train.main, train_argv(resumable, broken_data_dir, 3, "--resume", flag, value))
    assert status != 0
    assert_one_line(message, f"train.py: error: {flag} {value}: the resumed run has {saved}")
    assert "--force" in message
    assert last.stat().st_mtime_ns == before


def test_resume_applies_a_new_epoch_total_and_says_so(resumable, broken_data_dir, capsys, no_test_eval):
    status, message = call_main(train.main, train_argv(resumable, broken_data_dir, 1, "--resume"))
    assert status != 0 and "--epochs 1: the resumed run has finished 2 epochs" in message
    assert call_main(train.main, train_argv(resumable, broken_data_dir, 3, "--resume")) == (0, "")
    assert "--epochs 3: applied (the run was set to 2)" in capsys.readouterr().out
    assert torch_load(resumable / "outputs" / "last.pth")["epoch"] == 3


def test_a_last_pth_of_an_older_format_is_refused_in_one_line(resumable, broken_data_dir, no_test_eval):
    """A last.pth written before the files carried a format (and before the backbone's learning-rate
    scale existed) cannot be continued: one line naming it and how to start over."""
    last = resumable / "outputs" / "last.pth"
    state = torch_load(last)
    del state["format"]
    for key in ("backbone", "features", "backbone_lr_scale"):
        state["config"].pop(key)
    for group in state["optimizer"]["param_groups"]:
        group.pop("lr_scale")
    torch.save(state, last)
    before = last.read_bytes()
    status, message = call_main(train.main, train_argv(resumable, broken_data_dir, 3, "--resume"))
    assert status != 0
    assert_one_line(message, f"train.py: error: --resume {last}: written by an older train.py")
    assert "start over with --force" in message
    assert last.read_bytes() == before


def test_the_resume_hint_is_quoted_so_that_it_pastes(tmp_path):
    args = SimpleNamespace(project=str(tmp_path / "my run ü"), data=str(tmp_path / "da ta"))
    command = train.resume_message(args, Path(args.project) / "outputs", 1, 0).splitlines()[-1]
    argv = shlex.split(command)
    assert argv[argv.index("--project") + 1] == args.project and argv[argv.index("--data") + 1] == args.data


# ---------------------------------------------------------------------------------------------
# One run per project


@pytest.mark.skipif(os.name != "posix", reason="advisory file locks (fcntl) are POSIX")
def test_second_run_on_a_project_in_use_stops_at_once_naming_the_lock_and_pid(broken_data_dir, tmp_path,
                                                                             no_test_eval):
    project = tmp_path / "project"
    first = train.lock_project(project, CPU_CONTEXT)  # what the first run holds while it runs
    try:
        status, message = call_main(train.main, train_argv(project, broken_data_dir, 1))
    finally:
        first.close()
    assert status != 0
    assert_one_line(message, f"train.py: error: {project / '.lock'}: another train.py run (pid {os.getpid()})")
    assert not (project / "outputs").exists()
    assert call_main(train.main, train_argv(project, broken_data_dir, 1)) == (0, "")  # closed: free again


@pytest.mark.skipif(os.name != "posix", reason="advisory file locks (fcntl) are POSIX")
def test_a_finished_run_releases_its_project(reference_run):
    train.lock_project(reference_run.project, CPU_CONTEXT).close()


# ---------------------------------------------------------------------------------------------
# SIGINT and SIGTERM: the step finished, last.pth saved, how to resume said


def start_training(project, data, epochs, logs):
    out, err = logs / "stdout.txt", logs / "stderr.txt"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *train_argv(project, data, epochs)],
                                   cwd=ROOT, stdout=stdout, stderr=stderr, env=SUBPROCESS_ENV)
    return process, out, err


def wait_for_text(process, path, text, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if text in path.read_text(errors="replace"):
            return
        if process.poll() is not None:
            pytest.fail(f"train.py ended ({process.returncode}) before printing {text!r}:\n"
                        f"{path.read_text(errors='replace')[-3000:]}")
        time.sleep(0.05)
    process.kill()
    pytest.fail(f"no {text!r} within {timeout}s")


def test_sigint_finishes_the_step_saves_and_says_how_to_resume(reference_run, broken_data_dir, tmp_path,
                                                               no_test_eval):
    project = tmp_path / "project"
    process, out, err = start_training(project, broken_data_dir, 2, tmp_path)
    try:
        # The split counts print after the handlers are installed (progress bars stay quiet in a log).
        wait_for_text(process, out, f"{'test':<10} ")
        process.send_signal(signal.SIGINT)
        status = process.wait(timeout=180)
    finally:
        if process.poll() is None:
            process.kill()
    output = out.read_text() + err.read_text(errors="replace")
    assert status == 130, output[-2000:]
    assert f"--project {project} --data {broken_data_dir} --resume" in output
    assert "Traceback" not in output
    last = torch_load(project / "outputs" / "last.pth")
    assert (last["epoch"], last["step"]) in ((0, 1), (1, 1)), "stopped after a step, mid-run"
    # Resume to the end.
    assert call_main(train.main, train_argv(project, broken_data_dir, 2, "--resume")) == (0, "")
    history = history_without_seconds(project / "outputs")
    assert [row["epoch"] for row in history] == ["1", "2"]
    assert history[0] == history_without_seconds(reference_run.outputs)[0]
    assert torch_load(project / "outputs" / "last.pth")["epoch"] == 2


@pytest.fixture(scope="module")
def sigterm_run(broken_data_dir, tmp_path_factory):
    """SIGTERM delivered in-process during the first step (the real signal to train.py's own
    handler), then the run resumed to the end."""
    project = tmp_path_factory.mktemp("sigterm") / "project"
    stdout = io.StringIO()

    def terminate_during_first_step(result, step):
        if step == 1:
            signal.raise_signal(signal.SIGTERM)
        return result

    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout):
        mp.setattr(train, "evaluate", no_test_evaluation)
        with mp.context() as loss_patched:
            patch_training_loss(loss_patched, terminate_during_first_step)
            stopped = call_main(train.main, train_argv(project, broken_data_dir, 2))
        last = torch_load(project / "outputs" / "last.pth")
        resumed = call_main(train.main, train_argv(project, broken_data_dir, 2, "--resume"))
    return SimpleNamespace(outputs=project / "outputs", project=project, stopped=stopped, resumed=resumed,
                           last_when_stopped=last, stdout=stdout.getvalue())


def test_sigterm_finishes_the_step_saves_and_says_how_to_resume(sigterm_run, broken_data_dir):
    assert sigterm_run.stopped[0] != 0
    assert f"--project {sigterm_run.project} --data {broken_data_dir} --resume" in sigterm_run.stdout
    last = sigterm_run.last_when_stopped
    assert (last["epoch"], last["step"]) == (0, 1) and last["partial"] and last["history"] == []
    assert sigterm_run.resumed == (0, "")


def test_run_stopped_mid_epoch_and_resumed_equals_the_uninterrupted_run(sigterm_run, reference_run):
    assert history_without_seconds(sigterm_run.outputs) == history_without_seconds(reference_run.outputs)
    for name in ("best.pth", "last.pth"):
        assert_same_weights(sigterm_run.outputs / name, reference_run.outputs / name)


def test_signal_during_the_last_validation_stops_before_the_test_evaluation(broken_data_dir, tmp_path, monkeypatch,
                                                                            capsys):
    real_validate, evaluated = train.validate, []

    def interrupted(*args, **kwargs):
        signal.raise_signal(signal.SIGINT)
        return real_validate(*args, **kwargs)

    monkeypatch.setattr(train, "validate", interrupted)
    monkeypatch.setattr(train, "evaluate", lambda *args, **kwargs: evaluated.append(1) or {})
    project = tmp_path / "project"
    status, _ = call_main(train.main, train_argv(project, broken_data_dir, 1))
    assert status == 130 and not evaluated
    assert "--resume" in capsys.readouterr().out
    assert torch_load(project / "outputs" / "last.pth")["epoch"] == 1


@pytest.mark.parametrize("signum", SIGNALS, ids=lambda s: s.name)
def test_signal_during_the_final_evaluation_is_one_line_and_leaves_no_results(signum, broken_data_dir, tmp_path,
                                                                              monkeypatch, capsys):
    def signalled(*args, **kwargs):
        signal.raise_signal(signum)
        raise AssertionError("the signal did not stop the evaluation")

    monkeypatch.setattr(predict, "build_gallery", signalled)
    project = tmp_path / "project"
    status, message = call_main(train.main, train_argv(project, broken_data_dir, 1))
    assert (status, message) == (128 + signum, "")
    stderr = capsys.readouterr().err.strip().splitlines()[-1]
    assert stderr.startswith(f"train.py: stopped by {signum.name} during the evaluation; the unfinished results")
    assert stderr.endswith(f"evaluate again with: python predict.py --project {project} --data {broken_data_dir}")
    assert not (project / "results").exists() and (project / "outputs" / "best.pth").is_file()


def test_in_process_run_restores_the_signal_handlers(reference_run):
    assert reference_run.handlers_after == reference_run.handlers_before


# ---------------------------------------------------------------------------------------------
# A diverging run: one line, the last good state kept


def test_non_finite_loss_stops_with_a_message_and_keeps_best(broken_data_dir, tmp_path, monkeypatch, no_test_eval):
    # one step per epoch: the second step is epoch 2
    patch_training_loss(monkeypatch, lambda result, step: nan_loss(result) if step == 2 else result)
    project = tmp_path / "project"
    status, message = call_main(train.main, train_argv(project, broken_data_dir, 2))
    assert status != 0
    assert_one_line(message, "train.py: error:")
    assert "nan" in message and "--lr" in message and "best.pth" in message
    outputs = project / "outputs"
    assert torch_load(outputs / "best.pth")["epoch"] == 1
    assert_finite_weights(outputs / "best.pth")
    assert torch_load(outputs / "last.pth")["epoch"] == 1  # the last good state, resumable
    assert_finite_weights(outputs / "last.pth")


def test_exploding_learning_rate_stops_with_a_message_naming_lr(broken_data_dir, tmp_path, no_test_eval):
    project = tmp_path / "project"
    status, message = call_main(train.main, train_argv(project, broken_data_dir, 2, "--lr", "1e30"))
    assert status != 0
    # a step at lr 1e30 leaves weights that overflow the next outputs, before any epoch ends
    assert message == ("train.py: error: the model's outputs became non-finite (the weights diverged); lower --lr "
                       f"or try --no-amp. no checkpoint was saved yet in {project / 'outputs'}")
    assert not list(project.rglob("*.pth"))


@pytest.mark.parametrize("where", ["training_loss", "validation"])
def test_divergence_in_the_first_epoch_does_not_claim_a_saved_checkpoint(where, broken_data_dir, tmp_path,
                                                                         monkeypatch, no_test_eval):
    if where == "training_loss":
        patch_training_loss(monkeypatch, lambda result, step: nan_loss(result))
    else:  # the weights took a finite but exploding step: the validation features overflow
        real_embed = scoring.embed_images
        monkeypatch.setattr(scoring, "embed_images", lambda *a, **k: real_embed(*a, **k) * float("inf"))
    project = tmp_path / "project"
    status, message = call_main(train.main, train_argv(project, broken_data_dir, 1))
    assert status != 0
    assert_one_line(message, "train.py: error:")
    assert "--lr" in message and "best.pth" not in message
    assert f"no checkpoint was saved yet in {project / 'outputs'}" in message
    assert not list(project.rglob("*.pth"))


# ---------------------------------------------------------------------------------------------
# A failed write (a full disk): one line naming the file, the previous checkpoint kept


@pytest.fixture(scope="module")
def disk_full_run(broken_data_dir, tmp_path_factory):
    """A 2-epoch run whose second last.pth write fails with ENOSPC after writing half a file."""
    project = tmp_path_factory.mktemp("disk_full") / "project"
    real_save, writes = torch.save, []

    def fill_disk_on_second_last(obj, f, *args, **kwargs):
        if Path(f).name.startswith(".last."):  # the temporary file of last.pth
            writes.append(Path(f).name)
            if len(writes) == 2:
                Path(f).write_bytes(b"PK\x03\x04 half a checkpoint")
                raise OSError(28, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "evaluate", no_test_evaluation)
        mp.setattr(files.torch, "save", fill_disk_on_second_last)
        status, message = call_main(train.main, train_argv(project, broken_data_dir, 2))
    return SimpleNamespace(outputs=project / "outputs", status=status, message=message)


def test_failed_write_ends_with_a_message_and_keeps_the_previous_checkpoint(disk_full_run):
    assert disk_full_run.status != 0
    assert disk_full_run.message == (
        f"train.py: error: could not write {disk_full_run.outputs / 'last.pth'} (No space left on device); "
        f"free disk space or fix permissions (or choose another path), then rerun with --resume: "
        f"{disk_full_run.outputs / 'last.pth'} holds the last complete state")
    last = torch_load(disk_full_run.outputs / "last.pth")
    assert last["epoch"] == 1 and len(last["history"]) == 1
    assert_finite_weights(disk_full_run.outputs / "best.pth")
    assert not [p.name for p in disk_full_run.outputs.iterdir() if ".tmp" in p.name]


def test_failed_write_message_names_the_file(disk_full_run):
    assert str(disk_full_run.outputs / "last.pth") in disk_full_run.message


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_torch_save_runtime_error_on_a_full_disk_is_one_line_naming_the_file(broken_data_dir, tmp_path, monkeypatch,
                                                                              no_test_eval):
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if Path(f).name.startswith(".last."):  # the temporary file of last.pth
            Path(f).write_bytes(b"PK\x03\x04 half a checkpoint")
            real_save(obj, "/dev/full")  # the RuntimeError torch.save really raises on a full disk
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(files.torch, "save", full_disk)
    project = tmp_path / "project"
    status, message = call_main(train.main, train_argv(project, broken_data_dir, 1))
    assert status != 0
    assert_one_line(message, f"train.py: error: could not write {project / 'outputs' / 'last.pth'} (torch.save")
    assert "free disk space" in message
    assert not [p.name for p in (project / "outputs").iterdir() if ".tmp" in p.name]
