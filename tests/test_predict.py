"""Tests of predict.py's command line: its error messages."""
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import SUBPROCESS_ENV

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("single_torch_thread")


# ---------------------------------------------------------------------------------------------
# The command line's errors (both commands run at once: each start imports torch)


@pytest.fixture(scope="module", autouse=True)
def cli_runs(tmp_path_factory):
    """Started with the module's first test, so the two interpreters start while the others run."""
    folder = tmp_path_factory.mktemp("cli")
    commands = {
        "no_args": [],
        "missing_image": ["--checkpoint", str(folder / "best.pth"), "--image", str(folder / "missing.jpg")],
    }
    running = {name: subprocess.Popen([sys.executable, "predict.py", *args], cwd=ROOT, text=True, env=SUBPROCESS_ENV,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
               for name, args in commands.items()}
    yield running, folder
    for process in running.values():
        if process.poll() is None:
            process.kill()
            process.communicate()


@pytest.fixture(scope="module")
def cli_errors(cli_runs):
    running, folder = cli_runs
    results = {}
    for name, process in running.items():
        stdout, stderr = process.communicate(timeout=180)
        results[name] = (process.returncode, stdout, stderr)
    return results, folder


def test_cli_without_arguments_fails_with_one_line_naming_project(cli_errors):
    results, _ = cli_errors
    code, stdout, stderr = results["no_args"]
    assert code != 0
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "--project" in lines[0] and lines[0].startswith("predict.py: error:")
    assert stdout == ""


def test_cli_image_that_does_not_exist_fails_with_a_clear_message(cli_errors):
    results, folder = cli_errors
    code, stdout, stderr = results["missing_image"]
    assert code != 0
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr
    assert str(folder / "missing.jpg") in lines[0] and "no such file" in lines[0]
