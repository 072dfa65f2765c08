"""How every file the project writes reaches the disk: atomically. The content goes to a
temporary file beside the target, which is then renamed over it, so a crash, a signal or a full
disk never leaves a half-written checkpoint, table or figure where the previous good one was."""
import os
from pathlib import Path


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
