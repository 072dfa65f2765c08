"""What every script's command line shares: a parser that refuses abbreviated flags and reports a
bad one in one line, the one way a command ends on an error or an interrupt (Ctrl-C, kill): one
line and an exit code (one_line_errors), and progress bars that suit both a terminal and a log
file."""
import argparse
import contextlib
import os
import signal
import sys
import threading

from tqdm import tqdm


class ArgumentParser(argparse.ArgumentParser):
    """argparse with allow_abbrev=False (`--epoch 1` is an error, not `--epochs 1`) and a one-line
    error instead of the whole usage text. `prog` names the script in that line."""

    def __init__(self, prog, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(prog=prog, allow_abbrev=False, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}; see --help\n")


class _LineWriter:
    """A file for tqdm when the output is not a terminal: each refresh becomes one plain line
    instead of a carriage return that rewrites the last one."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        text = text.replace("\r", "").rstrip()
        if text:
            self.stream.write(text + "\n")

    def flush(self):
        self.stream.flush()


def progress(iterable, desc, disable=False, **kwargs):
    """tqdm on a terminal; in a log file a plain line every 30 seconds, none for shorter loops."""
    if sys.stderr.isatty():
        return tqdm(iterable, desc=desc, disable=disable, dynamic_ncols=True, **kwargs)
    return tqdm(iterable, desc=desc, disable=disable, file=_LineWriter(sys.stderr), ncols=100,
                mininterval=30, maxinterval=30, delay=30, **kwargs)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM during a command (interrupt_handler); a command that puts something back
    sets `note`: what it put back."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


def interrupt_handler():
    """SIGINT / SIGTERM raise Interrupted in the main process, once: the clean-up it starts is not
    interrupted by a second signal."""
    main_pid, raised = os.getpid(), []

    def interrupt(signum, _frame):
        if os.getpid() != main_pid or raised:
            return  # a DataLoader worker inherited this handler, or the clean-up is under way
        raised.append(signum)
        raise Interrupted(signum)
    return interrupt


@contextlib.contextmanager
def interrupts_raise():
    """SIGINT and SIGTERM raise Interrupted inside the block (in the main thread; elsewhere signals
    cannot be handled), and the previous handlers are back after it."""
    signals = (signal.SIGINT, signal.SIGTERM) if threading.current_thread() is threading.main_thread() else ()
    handler = interrupt_handler()
    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


def stop_after_step(stop):
    """train.py's handler: the first SIGINT / SIGTERM is noted in stop["signal"] (the loop finishes
    its step, saves last.pth and exits); a second one stops at once."""
    main_pid = os.getpid()

    def request_stop(signum, _frame):
        if os.getpid() != main_pid:
            return  # a DataLoader worker inherited this handler; the main process does the work
        if stop["signal"] is not None:
            raise KeyboardInterrupt
        stop["signal"] = signum
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"\n{signal.Signals(signum).name}: finishing this step and saving last.pth ...", flush=True)
    return request_stop


@contextlib.contextmanager
def one_line_errors(prog, write_advice="free disk space or fix permissions", interrupts=True):
    """A command's body: what a user can cause ends it in one line and an exit code. A ValueError
    (a bad flag, DataError, WeightsError) exits 1 with its message; an OSError (a full disk, a
    folder without write permission) names the file and `write_advice` (a string, or a function
    giving one); with `interrupts`, SIGINT and SIGTERM raise Interrupted and exit 128 + the signal,
    as a process killed by it would, saying what was put back."""
    try:
        with interrupts_raise() if interrupts else contextlib.nullcontext():
            yield
    except Interrupted as stopped:
        note = getattr(stopped, "note", None) or "nothing was written"
        print(f"{prog}: stopped by {signal.Signals(stopped.signum).name}; {note}", file=sys.stderr)
        sys.exit(128 + stopped.signum)
    except ValueError as error:
        sys.exit(f"{prog}: error: {error}")
    except OSError as error:
        advice = write_advice() if callable(write_advice) else write_advice
        sys.exit(f"{prog}: error: could not write {error.filename or 'a file'} ({error.strerror or error}); {advice}")
