"""Tests of history.py: an epoch's running totals, the collapse warning, which epoch --select keeps,
and history.csv; and the embedding spread that validation measures for the collapse warning."""
import csv
import math
from pathlib import Path

import pytest
import torch

from config import RunConfig
from distributed import RunContext
from history import HISTORY_COLUMNS, EpochTotals, collapse_warning, selected_epoch, selection_key, write_history
from losses import BatchResult
from modules import EmbeddingNetwork

CPU_CONTEXT = RunContext(rank=0, world_size=1, device=torch.device("cpu"), outputs=Path("outputs"), workers=0)


# ---------------------------------------------------------------------------------------------
# EpochTotals


def test_epoch_totals_sum_each_steps_loss_weighted_by_its_count():
    totals = EpochTotals()
    totals.update(0.5, BatchResult(torch.tensor(0.5), torch.tensor(3), 4, 0.25))
    totals.update(1.0, BatchResult(torch.tensor(1.0), 1, 2, 0.75))
    assert totals.as_list() == [0.5 * 4 + 1.0 * 2, 4.0, 6.0, 1.0, 2.0]
    assert totals.loss / totals.count == pytest.approx(4 / 6)  # the epoch's mean loss per pair
    assert totals.active / totals.steps == pytest.approx(0.5)


def test_epoch_totals_update_ignores_a_nan_active_fraction():
    """The losses that report no active fraction (bce, ce) give nan: the sum stays a number."""
    totals = EpochTotals()
    totals.update(0.3, BatchResult(torch.tensor(0.3), 2, 4))  # active defaults to nan
    totals.update(0.1, BatchResult(torch.tensor(0.1), 4, 4, math.nan))
    assert totals.active == 0.0 and not math.isnan(totals.active)
    assert (totals.steps, totals.count, totals.correct) == (2, 8, 6)
    totals.update(0.2, BatchResult(torch.tensor(0.2), 1, 4, 0.4))
    assert totals.active == pytest.approx(0.4)


def test_epoch_totals_round_trip_through_their_list_and_one_process_sum():
    totals = EpochTotals(2.5, 3.0, 8.0, 0.5, 2.0)
    assert EpochTotals(*totals.as_list()) == totals  # as last.pth keeps them
    assert totals.summed_over_processes(CPU_CONTEXT) == totals


# ---------------------------------------------------------------------------------------------
# collapse_warning


def test_collapse_warning_fires_on_constant_embeddings():
    features = torch.ones(10, 8) / math.sqrt(8)  # every image the same unit vector
    spread = (features - features.mean(0)).norm(dim=1).mean().item()
    row = {"epoch": 3, "embedding_spread": spread, "active_fraction": 0.5}
    assert "collapsed at epoch 3" in collapse_warning(row)
    assert collapse_warning({"epoch": 3, "embedding_spread": 0.4, "active_fraction": 0.0})
    assert collapse_warning({"epoch": 3, "embedding_spread": 0.4, "active_fraction": 0.3}) is None


def test_collapse_warning_names_what_to_change():
    warning = collapse_warning({"epoch": 2, "embedding_spread": 1e-5, "active_fraction": 0.2})
    assert warning.startswith("WARNING:") and "\n" not in warning
    assert all(flag in warning for flag in ("--lr", "--margin", "--miner", "--per-class"))


def test_collapse_warning_ignores_a_nan_active_fraction():
    """bce and ce report no active fraction (nan): only their spread can warn."""
    assert collapse_warning({"epoch": 1, "embedding_spread": 0.4, "active_fraction": math.nan}) is None
    assert collapse_warning({"epoch": 1, "embedding_spread": 0.0, "active_fraction": math.nan})


def test_validation_embedding_spread_is_zero_for_collapsed_embeddings(tiny_data_dir):
    """train.validate measures the spread that collapse_warning reads."""
    import train
    from dataset import load_split

    torch.manual_seed(0)
    model = EmbeddingNetwork("none", embed_dim=8)
    with torch.no_grad():  # a collapsed projection: one output for every image
        model.projection.weight.zero_()
        model.projection.bias.fill_(1.0)
    train_split, validation = load_split(tiny_data_dir, "train"), load_split(tiny_data_dir, "validation")
    config = RunConfig(image_size=32, val_batch_size=8, seed=0, gallery_size=3, score="knn", k=3)
    row = train.validate(model, train_split, validation, config, CPU_CONTEXT, amp=False)
    assert row["embedding_spread"] == pytest.approx(0.0, abs=1e-6)
    assert collapse_warning({**row, "epoch": 1, "active_fraction": 0.5})
    # and the same model with a working projection has a clearly non-zero spread
    model.projection.reset_parameters()
    row = train.validate(model, train_split, validation, config, CPU_CONTEXT, amp=False)
    assert row["embedding_spread"] > 1e-3
    assert collapse_warning({**row, "epoch": 1, "active_fraction": 0.5}) is None


# ---------------------------------------------------------------------------------------------
# selection_key and selected_epoch


def test_selection_prefers_higher_auc_then_lower_loss():
    rows = [{"val_auc": 0.9, "val_loss": 0.3}, {"val_auc": 1.0, "val_loss": 0.5}, {"val_auc": 1.0, "val_loss": 0.2}]
    keys = [selection_key(r, "val_auc") for r in rows]
    assert max(range(3), key=lambda i: keys[i]) == 2
    assert selection_key(rows[1], "val_auc") > selection_key(rows[0], "val_auc")  # AUC first, whatever the loss
    assert max(range(3), key=lambda i: selection_key(rows[i], "val_loss")) == 2
    assert selection_key(rows[0], "val_loss") > selection_key(rows[1], "val_loss")


def test_selected_epoch_is_the_first_best_by_the_select_rule():
    history = [{"epoch": 1, "val_auc": 0.8, "val_loss": 0.4}, {"epoch": 2, "val_auc": 0.95, "val_loss": 0.6},
               {"epoch": 3, "val_auc": 0.95, "val_loss": 0.3}, {"epoch": 4, "val_auc": 0.95, "val_loss": 0.3},
               {"epoch": 5, "val_auc": 0.7, "val_loss": 0.2}]
    assert selected_epoch(history, "val_auc") == 3  # ties on AUC and loss: the first, as the loop keeps it
    assert selected_epoch(history, "val_loss") == 5


# ---------------------------------------------------------------------------------------------
# write_history


def row_of(epoch):
    return {"epoch": epoch, "train_loss": 0.5, "train_acc": 0.75, "val_loss": 0.4, "val_acc": 0.8, "val_auc": 0.9,
            "active_fraction": math.nan, "embedding_spread": 0.3, "lr": 1e-3, "seconds": 1.5}


def test_write_history_writes_one_row_per_epoch_under_the_columns(tmp_path):
    path = tmp_path / "history.csv"
    write_history([row_of(1), row_of(2)], path)
    with open(path, newline="") as file:
        reader = csv.DictReader(file)
        rows = list(reader)
    assert reader.fieldnames == HISTORY_COLUMNS
    assert [int(r["epoch"]) for r in rows] == [1, 2] and float(rows[1]["lr"]) == 1e-3
    assert math.isnan(float(rows[0]["active_fraction"]))
    assert [p.name for p in tmp_path.iterdir()] == ["history.csv"]  # no temporary file left


def test_write_history_that_fails_midway_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "history.csv"
    write_history([row_of(1)], path)
    before = path.read_text()

    def disk_full_after_one_row(writer, rows):
        writer.writerow(rows[0])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(csv.DictWriter, "writerows", disk_full_after_one_row)
    with pytest.raises(OSError, match="No space left"):
        write_history([row_of(1), row_of(2)], path)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["history.csv"]
