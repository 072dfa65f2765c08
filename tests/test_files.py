"""files.py: atomic writes (torch.save's failures included), tensors read back without running
code, the overlap check, the project lock, and the clean-up of what a killed writer left."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import files  # noqa: E402
from files import (WeightsError, load_state, lock_folder, overlaps, process_exists,  # noqa: E402
                   remove_stale_temporaries, save_atomic, write_atomic, write_text_atomic)
from helpers import torch_load  # noqa: E402


def dead_pid():
    """The pid of a process that has ended."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_write_atomic_leaves_the_old_file_when_the_write_fails(tmp_path):
    path = tmp_path / "metrics.json"
    write_text_atomic(path, "old\n")

    def half_then_full_disk(tmp):
        Path(tmp).write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError) as failed:
        write_atomic(path, half_then_full_disk)
    assert failed.value.filename == str(path)
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_save_atomic_turns_torchs_runtime_error_into_an_os_error_naming_the_file(tmp_path, monkeypatch):
    path = tmp_path / "gallery.pt"
    save_atomic({"threshold": 0.5}, path)

    def full_disk(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"PK\x03\x04 half")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(files.torch, "save", full_disk)
    with pytest.raises(OSError) as error:
        save_atomic({"threshold": 0.7}, path)
    assert error.value.filename == str(path) and "unexpected pos" in error.value.strerror
    monkeypatch.undo()
    assert torch_load(path) == {"threshold": 0.5} and [p.name for p in tmp_path.iterdir()] == ["gallery.pt"]


def test_load_state_reads_tensors_back(tmp_path):
    save_atomic({"weights": torch.arange(3.0), "epoch": 2}, tmp_path / "a.pth")
    state = load_state(tmp_path / "a.pth")
    assert torch.equal(state["weights"], torch.arange(3.0)) and state["epoch"] == 2


@pytest.mark.parametrize("content, what", [(None, "no such file"), (b"", "truncated or corrupt"),
                                           (b"PK\x03\x04 half a file", "truncated or corrupt")])
def test_load_state_of_a_missing_or_damaged_file_is_one_line_naming_it(content, what, tmp_path):
    path = tmp_path / "last.pth"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(WeightsError) as error:
        load_state(path, "--resume")
    message = str(error.value)
    assert message.startswith(f"--resume {path}: ") and what in message and "\n" not in message


@pytest.mark.skipif(os.name != "posix", reason="advisory file locks (fcntl) are POSIX")
def test_lock_folder_is_held_until_closed_and_names_its_holder(tmp_path):
    first, holder = lock_folder(tmp_path / "project")
    assert first is not None and holder is None
    try:
        assert lock_folder(tmp_path / "project") == (None, str(os.getpid()))
    finally:
        first.close()
    again, holder = lock_folder(tmp_path / "project")
    assert again is not None and holder is None
    again.close()


def test_overlaps_is_true_for_the_same_path_a_parent_or_a_child(tmp_path):
    assert overlaps(tmp_path, tmp_path) and overlaps(tmp_path, tmp_path / "a") and overlaps(tmp_path / "a", tmp_path)
    assert not overlaps(tmp_path / "a", tmp_path / "b")


def test_stale_temporaries_of_dead_processes_are_removed_and_live_ones_kept(tmp_path):
    dead = tmp_path / f".last.tmp-{dead_pid()}.pth"
    mine = tmp_path / f".history.tmp-{os.getpid()}.csv"  # a write under way in a live process
    for path in (dead, mine, tmp_path / "last.pth", tmp_path / ".lock"):
        path.write_bytes(b"x")
    assert not process_exists(int(dead.name.split("-")[1].split(".")[0])) and process_exists(os.getpid())
    assert remove_stale_temporaries(tmp_path) == [dead.name]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine.name, "last.pth", ".lock"])


def test_save_atomic_writes_the_object_and_leaves_no_temporary_file(tmp_path):
    save_atomic({"a": torch.arange(3)}, tmp_path / "best.pth")
    save_atomic({"a": torch.arange(4)}, tmp_path / "best.pth")  # overwrites
    assert [p.name for p in tmp_path.iterdir()] == ["best.pth"]
    assert torch.equal(torch.load(tmp_path / "best.pth", weights_only=True)["a"], torch.arange(4))


def test_save_atomic_failure_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "best.pth"
    save_atomic({"a": torch.arange(3)}, path)

    def disk_full(obj, file):
        Path(file).write_bytes(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_atomic({"a": torch.arange(100)}, path)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["best.pth"]
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.arange(3))
