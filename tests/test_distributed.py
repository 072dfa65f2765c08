"""torchrun with 2 processes on the gloo backend, on the CPU: DDP trains, only rank 0 writes and
prints, and the result is a normal project folder."""
import csv
import json
import math
import subprocess
import sys
from pathlib import Path

from dataset import make_synthetic

REPO = Path(__file__).resolve().parents[1]


def test_torchrun_two_processes_gloo(tmp_path):
    data = tmp_path / "data"
    make_synthetic(data, size=40, seed=0, counts={"train": (12, 8), "validation": (6, 4), "test": (6, 4)})
    project = tmp_path / "exp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "train.py", "--project", str(project), "--data", str(data), "--weights", "none",
               "--image-size", "32", "--epochs", "2", "--batch-size", "4", "--val-batch-size", "4",
               "--lr", "1e-3", "--workers", "0", "--gallery-size", "4", "--save-every", "5",
               "--cache", str(tmp_path / "cache")]  # --sync-bn needs CUDA
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # rank 0 alone prints the epoch summaries and writes the files
    assert result.stdout.count("epoch   1/2") == 1 and result.stdout.count("epoch   2/2") == 1
    rows = list(csv.DictReader(open(project / "outputs" / "history.csv")))
    assert len(rows) == 2 and all(math.isfinite(float(r["val_auc"])) for r in rows)
    metrics = json.loads((project / "results" / "metrics.json").read_text())
    assert metrics["n_test_pairs"] == 10 and math.isfinite(metrics["test_auc"])
    assert len(list((tmp_path / "cache").glob("*.u8"))) == 3  # one cache per split, built once
