"""train.py's pieces: the command line, each loss learning on a tiny batch, the collapse guard
and the best-checkpoint rule."""
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from dataset import ImageDataset, ShuffledBatches, BalancedBatches, collate_images, load_split, train_transform
from modules import build_model, metric_loss

REPO = Path(__file__).resolve().parents[1]


def test_help_explains_every_flag():
    result = subprocess.run([sys.executable, "train.py", "--help"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0
    for flag in ("--project", "--data", "--epochs", "--batch-size", "--val-batch-size", "--lr", "--weight-decay",
                 "--image-size", "--benign-limit", "--weights", "--device", "--seed", "--workers", "--loss",
                 "--pairing", "--embed-dim", "--margin", "--miner", "--per-class", "--select", "--gallery-size",
                 "--classify", "--k", "--target-sensitivity", "--cache", "--compile", "--sync-bn", "--resume", "--force"):
        assert flag in result.stdout, flag


def test_defaults_are_the_studys(tmp_path):
    config = train.make_config(train.parse_args(["--project", "p", "--data", str(tmp_path)]))
    assert (config["epochs"], config["batch_size"], config["val_batch_size"]) == (20, 128, 16)
    assert (config["lr"], config["weight_decay"], config["image_size"]) == (1e-5, 1e-5, 224)
    assert config["loss"] == "bce" and config["weights"] == "imagenet"
    assert config["benign_limit"] == [4000, 1000, 1000]


@pytest.mark.parametrize("flags, message", [
    (["--image-size", "16"], "--image-size 16"), (["--batch-size", "0"], "--batch-size 0"),
    (["--loss", "bce", "--classify", "direct"], "--classify direct"), (["--benign-limit", "1", "2"], "--benign-limit"),
    (["--resume", "--force"], "--resume and --force")])
def test_bad_flags_are_refused_with_the_flag_named(flags, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        train.check_args(train.parse_args(["--project", "p", "--data", str(tmp_path), *flags]))


@pytest.mark.parametrize("loss", ["bce", "contrastive", "triplet", "ce"])
def test_each_loss_decreases_on_a_tiny_batch_within_a_few_steps(loss, tiny_data_dir):
    torch.manual_seed(0)
    config = train.make_config(train.parse_args(["--project", "p", "--data", str(tiny_data_dir), "--loss", loss,
                                                 "--weights", "none", "--image-size", "32", "--batch-size", "8",
                                                 "--per-class", "4", "--partners-per-class", "4"]))
    split = load_split(tiny_data_dir, "train")
    dataset = ImageDataset(split, train_transform(32), augment=False)
    sampler = (BalancedBatches(split.labels, 4, 0) if loss in ("contrastive", "triplet")
               else ShuffledBatches(split.labels, 8, 0, 4))
    batch = collate_images([dataset[item] for item in next(iter(sampler))])
    model = build_model(config)
    criterion, miner = metric_loss(loss, config["margin"], config["miner"]) if loss in ("contrastive", "triplet") else (None, None)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        generator = torch.Generator().manual_seed(0)  # the same pairs every step: a fixed objective
        value, *_ = train.training_loss(model, batch, config, torch.device("cpu"), generator, criterion, miner,
                                        torch.tensor(1.5))
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        losses.append(value.item())
    assert losses[-1] < losses[0], losses


def test_collapse_warning_fires_on_constant_embeddings():
    features = torch.ones(10, 8) / math.sqrt(8)  # every image the same unit vector
    spread = (features - features.mean(0)).norm(dim=1).mean().item()
    row = {"epoch": 3, "embedding_spread": spread, "active_fraction": 0.5}
    assert "collapsed at epoch 3" in train.collapse_warning(row)
    assert train.collapse_warning({"epoch": 3, "embedding_spread": 0.4, "active_fraction": 0.0})
    assert train.collapse_warning({"epoch": 3, "embedding_spread": 0.4, "active_fraction": 0.3}) is None


def test_selection_prefers_higher_auc_then_lower_loss():
    rows = [{"val_auc": 0.9, "val_loss": 0.3}, {"val_auc": 1.0, "val_loss": 0.5}, {"val_auc": 1.0, "val_loss": 0.2}]
    scores = [train.selection_score(r, "val_auc") for r in rows]
    assert max(range(3), key=lambda i: scores[i]) == 2
    assert max(range(3), key=lambda i: train.selection_score(rows[i], "val_loss")) == 2
    assert train.selection_score(rows[0], "val_loss") > train.selection_score(rows[1], "val_loss")
