"""Tests of distributed.py and of training under DDP: one process without torchrun's variables,
RunContext and the default workers; torchrun with 2 processes on the gloo backend, on the CPU (DDP
trains, only rank 0 writes and prints, and the result is a normal project folder); and the
metric losses mining over every rank's embeddings."""
import argparse
import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

import distributed
from distributed import RunContext, default_workers, run_context, setup_distributed
from synthetic import make_synthetic
from helpers import SUBPROCESS_ENV

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# distributed.py in one process


@pytest.fixture
def no_torchrun(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(key, raising=False)


def test_without_torchrun_one_process_is_rank_0_of_1_on_the_picked_device(no_torchrun):
    import torch

    assert setup_distributed("cpu") == (0, 1, torch.device("cpu"))


def test_under_torchrun_a_numbered_gpu_is_refused(no_torchrun, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="--device cuda:1: under torchrun each process takes the GPU of its "
                                         "LOCAL_RANK"):
        setup_distributed("cuda:1")


def test_run_context_of_one_process_prints_and_sums_as_is(tmp_path, capsys):
    import torch

    args = argparse.Namespace(workers=3, project=str(tmp_path / "exp"))
    ctx = run_context(args, 0, 1, torch.device("cpu"))
    assert (ctx.rank, ctx.world_size, ctx.workers, ctx.outputs) == (0, 1, 3, tmp_path / "exp" / "outputs")
    assert ctx.sum([1.5, 2.0, 0.25]) == [1.5, 2.0, 0.25]
    ctx.say("rank 0 speaks")
    RunContext(1, 2, torch.device("cpu"), ctx.outputs, 0).say("rank 1 does not")
    assert capsys.readouterr().out == "rank 0 speaks\n"


@pytest.mark.parametrize("cores, world_size, workers", [(16, 1, 8), (16, 2, 7), (4, 1, 3), (2, 2, 1), (None, 1, 1)])
def test_default_workers_are_the_cores_left_to_each_process_from_1_to_8(monkeypatch, cores, world_size, workers):
    monkeypatch.setattr(distributed.os, "cpu_count", lambda: cores)
    assert default_workers(world_size) == workers
    args = argparse.Namespace(workers=None, project="p")
    assert run_context(args, 0, world_size, None).workers == workers


# ---------------------------------------------------------------------------------------------
# torchrun


def test_torchrun_two_processes_gloo(tmp_path):
    """EfficientNet-Lite0 under the transfer recipe with two parameter groups (the backbone at
    half the learning rate) through DDP's gradient all-reduce."""
    data = tmp_path / "data"
    make_synthetic(data, size=40, seed=0, counts={"train": (12, 8), "validation": (6, 4), "test": (6, 4)})
    project = tmp_path / "exp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "train.py", "--project", str(project), "--data", str(data), "--weights", "none",
               "--image-size", "32", "--epochs", "2", "--batch-size", "4", "--val-batch-size", "4",
               "--lr", "1e-3", "--workers", "0", "--gallery-size", "4", "--save-every", "5",
               "--cache", str(tmp_path / "cache"), "--backbone", "efficientnet_lite0", "--recipe", "transfer",
               "--backbone-lr-scale", "0.5"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, env=SUBPROCESS_ENV)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # rank 0 alone prints the epoch summaries and writes the files
    assert result.stdout.count("epoch   1/2") == 1 and result.stdout.count("epoch   2/2") == 1
    rows = list(csv.DictReader(open(project / "outputs" / "history.csv")))
    assert len(rows) == 2 and all(math.isfinite(float(r["val_auc"])) for r in rows)
    metrics = json.loads((project / "results" / "metrics.json").read_text())
    assert metrics["n_test_pairs"] == 10 and math.isfinite(metrics["test_auc"])
    assert len(list((tmp_path / "cache").glob("*.u8"))) == 3  # one cache per split, built once


# ---------------------------------------------------------------------------------------------
# The metric losses under DDP


DDP_CASES = [("triplet", "all"), ("contrastive", "all")]


def _batch():
    import torch

    torch.manual_seed(0)
    return torch.nn.functional.normalize(torch.randn(16, 8), dim=1), torch.tensor([0, 1] * 8)


def _wrapped_losses_on_half(rank, init_file, results):
    import torch.distributed as dist

    from losses import metric_loss

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    embeddings, labels = _batch()
    half = slice(rank * 8, rank * 8 + 8)
    for name, miner in DDP_CASES:
        loss_fn, miner_fn = metric_loss(name, 0.2 if name == "triplet" else 0.5, miner, world_size=2)
        mine = embeddings[half].clone().requires_grad_()
        loss = loss_fn(mine, labels[half], miner_fn(mine, labels[half]) if miner_fn else None)
        results[rank, name] = loss.item()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_losses(tmp_path_factory):
    """{(rank, loss name): the wrapped loss of that rank's half of the batch}, from one pair of gloo
    processes for every case (each process start imports torch)."""
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(_wrapped_losses_on_half, args=(tmp_path_factory.mktemp("ddp") / "init", results), nprocs=2)
    return dict(results)


@pytest.mark.parametrize("name, miner", DDP_CASES)
def test_metric_losses_under_ddp_see_every_ranks_embeddings(name, miner, ddp_losses):
    """Two gloo processes, each with half of a batch: the wrapped loss equals the loss of one
    process over the whole batch (mining only within each half would give another number)."""
    from losses import metric_loss

    embeddings, labels = _batch()
    loss_fn, miner_fn = metric_loss(name, 0.2 if name == "triplet" else 0.5, miner)
    whole = loss_fn(embeddings, labels, miner_fn(embeddings, labels) if miner_fn else None).item()
    halves = [loss_fn(embeddings[h], labels[h], miner_fn(embeddings[h], labels[h]) if miner_fn else None).item()
              for h in (slice(0, 8), slice(8, 16))]
    # pytorch-metric-learning scales the loss by the world size, so that DDP's averaging of the
    # gradients over ranks gives the gradient of the whole-batch loss
    assert ddp_losses[0, name] == pytest.approx(2 * whole, rel=1e-5)
    assert ddp_losses[1, name] == pytest.approx(2 * whole, rel=1e-5)
    assert sum(halves) / 2 != pytest.approx(whole, rel=1e-3)  # what per-rank mining would have given
