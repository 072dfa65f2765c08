"""The training history: an epoch's running totals, its row of history.csv, and which epoch
--select keeps in best.pth."""
import csv
import math
from dataclasses import dataclass

from files import write_atomic

HISTORY_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_auc",
                   "active_fraction", "embedding_spread", "lr", "seconds"]


@dataclass
class EpochTotals:
    """An epoch's running training totals, summed over its steps (pytorch/examples'
    AverageMeter, for the five numbers its history row is made of); last.pth keeps them as a list."""
    loss: float = 0.0     # batch loss x batch count
    correct: float = 0.0  # pairs (or images) the model got right
    count: float = 0.0    # pairs (or images)
    active: float = 0.0   # a metric loss's fraction of active pairs or triplets, per step
    steps: float = 0.0

    def update(self, loss_value, result):
        self.loss += loss_value * result.count
        self.correct += float(result.correct)
        self.count += result.count
        self.active += 0.0 if math.isnan(result.active) else result.active
        self.steps += 1

    def as_list(self):
        return [self.loss, self.correct, self.count, self.active, self.steps]

    def summed_over_processes(self, ctx):
        return EpochTotals(*ctx.sum(self.as_list()))


def collapse_warning(row):
    """A warning when an epoch's embeddings have collapsed (all alike, or nothing left active)."""
    if row["embedding_spread"] < 1e-3 or row["active_fraction"] == 0:
        return (f"WARNING: the embeddings look collapsed at epoch {row['epoch']} (spread "
                f"{row['embedding_spread']:.2e}, active {row['active_fraction']:.3f}); lower --lr, change "
                f"--margin or --miner, or use more images per class (--per-class)")
    return None


def selection_key(row, select):
    """How --select ranks an epoch (the selection metric, not an image-level --score): larger is
    better. val_auc ties (a small validation set reaches 1.0 early) go to the lower loss."""
    return [row["val_auc"], -row["val_loss"]] if select == "val_auc" else [-row["val_loss"]]


def selected_epoch(history, select):
    """The epoch best.pth holds: the first ranked highest by selection_key, as the loop keeps it."""
    return max(history, key=lambda row: selection_key(row, select))["epoch"]


def write_history(history, path):
    def write(tmp):
        with open(tmp, "w", newline="") as file:
            writer = csv.DictWriter(file, HISTORY_COLUMNS)
            writer.writeheader()
            writer.writerows(history)
    write_atomic(path, write)
