"""files.py: atomic writes, the overlap check, and the clean-up of what a killed writer left."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from files import overlaps, process_exists, remove_stale_temporaries, write_atomic, write_text_atomic  # noqa: E402


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
