"""What several test files share: the tiny CPU training flags, the command lines run as a user
runs them (one OpenMP thread each) or in-process (call_main), and the checks of a one-line error.
The fixtures are in conftest.py."""
import io
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--weights", "none", "--image-size", "32", "--epochs", "2", "--batch-size", "8", "--val-batch-size", "8",
        "--lr", "1e-3", "--workers", "0", "--gallery-size", "4", "--save-every", "5"]
# One OpenMP thread per command: on a busy 2-core machine (CI, pytest -n 2) several threads per
# process on 32 px images are many times slower than one.
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def tiny(epochs=2, **flags):
    """TINY with other values for some flags: tiny(1, batch_size=32)."""
    argv = TINY[:]
    argv[argv.index("--epochs") + 1] = str(epochs)
    for name, value in flags.items():
        argv[argv.index("--" + name.replace("_", "-")) + 1] = str(value)
    return argv


def run_script(script, *args, timeout=600):
    """A script's command line in a fresh interpreter; its stdout. Fails the test on a non-zero exit."""
    result = subprocess.run([sys.executable, script, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                            timeout=timeout, env=SUBPROCESS_ENV)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def make_clinic(folder, seed=7):
    """FOLDER/clinic/{0,1}/*.jpg: another clinic's labelled folder (5 benign, 4 malignant, 40 px,
    drawn unlike tiny_data_dir's). Returns its path."""
    from synthetic import make_synthetic

    make_synthetic(Path(folder) / "other", size=40, seed=seed, counts={"test": (5, 4)})
    return (Path(folder) / "other" / "test_data").rename(Path(folder) / "clinic")


# ---------------------------------------------------------------------------------------------
# A script's main() in-process, and what its errors look like

SIGNALS = (signal.SIGINT, signal.SIGTERM)
# The files of conftest.broken_data_dir that every run excludes at start-up, with a reason.
BROKEN_FILES = {"zero_bytes.jpg", "truncated.jpg", "not_a_jpeg.jpg", "notes.txt", "huge.jpg", "zero_val.jpg"}


def train_argv(project, data, epochs=2, *flags):
    """train.py's arguments for PROJECT on DATA: TINY for EPOCHS epochs, then FLAGS (a later flag
    overrides an earlier one)."""
    return ["--project", str(project), "--data", str(data), *tiny(epochs), *map(str, flags)]


def evaluate_argv(project, data, *flags):
    """predict.py's arguments evaluating PROJECT on DATA on the CPU, with train_argv's gallery size."""
    return ["--project", project, "--data", data, "--device", "cpu", "--save-every", "5", "--gallery-size", "4",
            *flags]


def call_main(main, argv):
    """A script's main(argv) in-process: (exit status, message of sys.exit(str) or ''). The signal
    handlers are put back afterwards, so a run cannot leave pytest deaf to Ctrl-C."""
    saved = {s: signal.getsignal(s) for s in SIGNALS}
    try:
        main([str(a) for a in argv])
        return 0, ""
    except SystemExit as exit_:
        code = exit_.code
        if code is None or isinstance(code, int):
            return code or 0, ""
        return 1, str(code)
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


def assert_one_line(message, prefix):
    """MESSAGE starts with PREFIX and is one line, without a traceback."""
    assert message.startswith(prefix), message
    assert "\n" not in message.strip(), f"not one line:\n{message}"
    assert "Traceback" not in message


def torch_load(path):
    """A file this repository saved, as plain tensors and data (weights_only) on the CPU."""
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def jpeg_bytes(mode="RGB", size=(40, 36), seed=0, fmt="JPEG"):
    """The bytes of a small random image file (JPEG unless FMT says otherwise)."""
    from PIL import Image

    rgb = (np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).convert(mode).save(buffer, format=fmt)
    return buffer.getvalue()


def tiny_config(loss, **settings):
    """A RunConfig of a tiny network from random weights (32 px, 16-d embedding), other settings the study's."""
    from config import RunConfig

    return RunConfig(**{"loss": loss, "weights": "none", "embed_dim": 16, "image_size": 32, "seed": 0,
                        "benign_limit": [0, 0, 0], **settings})


def write_scores_csv(folder, images, labels, probabilities, power=1):
    """FOLDER/results/scores.csv as predict.py writes it (scores_csv.write_scores): the raw score
    (ranked as its P(malignant) but on another scale, probability ** power), then its P(malignant)."""
    from scores_csv import write_scores

    (folder / "results").mkdir(parents=True)
    probabilities = np.asarray(probabilities)
    write_scores(SimpleNamespace(paths=images, labels=np.asarray(labels)), {"gallery": probabilities ** power},
                 {"gallery": probabilities}, folder / "results" / "scores.csv")
