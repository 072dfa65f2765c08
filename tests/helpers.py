"""What several test files share: the tiny CPU training flags and the command lines run as a user
runs them (one OpenMP thread each). The fixtures are in conftest.py."""
import os
import subprocess
import sys
from pathlib import Path

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
