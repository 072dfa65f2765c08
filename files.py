"""How every file the project writes reaches the disk: atomically. The content goes to a
temporary file beside the target, which is then renamed over it, so a crash, a signal or a full
disk never leaves a half-written checkpoint, table or figure where the previous good one was.
Tensors are read back with weights_only=True: a file that carries pickled code is refused, unrun."""
import os
from pathlib import Path

try:
    import fcntl  # advisory file locks (POSIX)
except ImportError:  # Windows: folders are not locked against other processes
    fcntl = None

import torch


class WeightsError(ValueError):
    """A weights or checkpoint file that cannot be used (missing, unreadable, refused, of another
    network, or diverged); its message is one line naming the file and what to do. A ValueError:
    a command reports it as it reports a bad flag (cli.one_line_errors)."""


def write_atomic(path, write):
    """Call write(temporary_path), then rename the temporary file to `path`. Any failure removes
    the temporary file; an OSError is raised again naming `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as error:
        raise OSError(error.errno, error.strerror or str(error), str(path)) from error
    finally:
        tmp.unlink(missing_ok=True)


def save_atomic(obj, path):
    """torch.save through write_atomic. torch.save's zip writer reports a full disk as a
    RuntimeError; it becomes an OSError naming the file, as every other failed write."""
    try:
        write_atomic(path, lambda tmp: torch.save(obj, tmp))
    except RuntimeError as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise OSError(None, f"torch.save failed: {reason}", str(path)) from error


def load_state(path, what="checkpoint"):
    """torch.load with weights_only=True, else one WeightsError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{what} {path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        if "Unsupported global" in str(error):
            raise WeightsError(f"{what} {path}: refused, the file holds pickled Python objects, not "
                               f"just tensors (it could run code); use a checkpoint written by this "
                               f"repo or a plain state_dict") from None
        raise WeightsError(f"{what} {path}: not a readable checkpoint ({error.__class__.__name__}); "
                           f"the file is truncated or corrupt, re-copy it or train again") from None

def check_finite_weights(state, path, what="checkpoint"):
    """A diverged run's NaN or inf weights would score every image alike (or fail much later)."""
    bad = [key for key, value in state.items()
           if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all()]
    if bad:
        advice = ("the run diverged; use an earlier checkpoint, or train again with a lower --lr"
                  if what == "checkpoint" else "the file is damaged or from a diverged run; pass another one")
        raise WeightsError(f"{what} {path}: {len(bad)} weight tensor(s) are not finite (NaN or inf, e.g. "
                           f"{bad[0]}): {advice}")


def remove_stale_temporaries(folder):
    """The temporary files write_atomic left in `folder` when its process was killed (kill -9, the
    OOM killer, a power cut) are removed; those of a process still running are left to it.
    Returns the names removed."""
    removed = []
    for tmp in sorted(Path(folder).glob(".*.tmp-*")):
        if left_by_an_ended_process(tmp, ".tmp-"):
            tmp.unlink(missing_ok=True)
            removed.append(tmp.name)
    return removed


def left_by_an_ended_process(path, marker):
    """Whether `path`, named `...<marker><pid>[.suffix]` by the process writing it, belongs to a
    process that has ended. A name without a pid after the marker is not ours: False."""
    pid = path.name.rsplit(marker, 1)[1].split(".")[0]
    return pid.isdigit() and not process_exists(int(pid))


def process_exists(pid):
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process is there
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def write_text_atomic(path, text):
    write_atomic(path, lambda tmp: tmp.write_text(text))


def folder_problem(path):
    """Why `path` cannot be used as an output folder (checked before any work, so a typo costs
    nothing): it is a file, or a file stands where one of its parent folders should be. None when
    it is a folder or can be created."""
    path = Path(path)
    for folder in (path, *path.parents):
        if folder.exists():
            if not folder.is_dir():
                return "is a file, not a folder" if folder == path else f"{folder} is a file, not a folder"
            return None if os.access(folder, os.W_OK) else f"{folder} is not writable"
    return None


def file_problem(path):
    """Why `path` cannot be written as an output file: it is a folder, or its folder is missing
    or is a file. None when it can."""
    path = Path(path)
    if path.is_dir():
        return "is a folder; name a file"
    if not path.parent.is_dir():
        return f"its folder {path.parent} does not exist; create it or name another file"
    return None if os.access(path.parent, os.W_OK) else f"its folder {path.parent} is not writable"


def overlaps(a, b):
    """Whether one path is, holds or lies inside the other: a step that moves or deletes one must
    not touch the other."""
    a, b = Path(a).resolve(), Path(b).resolve()
    return a == b or a in b.parents or b in a.parents


def lock_folder(folder):
    """(the open lock file, None), or (None, the pid holding it): an advisory lock on FOLDER/.lock
    that the OS releases when the process ends, even after kill -9. Without fcntl: (None, None)."""
    path, holder = Path(folder) / ".lock", None
    if fcntl is None:
        return None, None
    path.parent.mkdir(parents=True, exist_ok=True)
    file = open(path, "a+")
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        file.truncate(0)
        file.write(f"{os.getpid()}\n")
        file.flush()
        return file, None
    except BlockingIOError:
        file.seek(0)
        holder = file.read().strip() or "unknown"
        file.close()
        return None, holder


def first_missing_folder(path):
    """The outermost folder on the way to `path` that does not exist yet, i.e. the one a command
    creates (None when `path` exists): what to remove if it fails before it starts."""
    path, missing = Path(path).absolute(), None
    while not path.exists():
        path, missing = path.parent, path
    return missing
