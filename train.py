"""Train the Siamese network on the ISIC 2020 split folders, then evaluate it on the test split.

    python train.py --project runs/exp1 --data DATA
    torchrun --nproc_per_node=4 train.py --project runs/exp1 --data DATA      # several GPUs (DDP)

Defaults are the study's: ResNet18 from ImageNet weights, batch 128, Adam lr 1e-5 and weight
decay 1e-5, BCE on the similarity of the design's pairs, 20 epochs. Writes PROJECT/outputs/
(best.pth, last.pth, history.csv, training_validation_metrics.png) and, through predict.py,
PROJECT/results/.
"""
import argparse
import csv
import datetime
import hashlib
import math
import os
import shlex
import shutil
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path

try:
    import fcntl  # advisory file locks (POSIX)
except ImportError:  # Windows: runs are not locked against each other
    fcntl = None

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from cli import ArgumentParser, Interrupted, interrupt_handler, progress
from dataset import (AUGMENTATIONS, BalancedBatches, ImageDataset, PairDataset, ShuffledBatches, batch_pairs,
                     collate_images, has_split, load_split, load_train_split, sample_seed, train_transform,
                     write_excluded)
from files import folder_problem, overlaps, remove_stale_temporaries, write_atomic, write_text_atomic
from images import DataError, attach_cache
from metrics import auc_or_nan
from near_duplicates import leaks
from modules import (BACKBONES, CONFIG_RULES, FEATURES, LOSSES, MINERS, OPTIMIZERS, PAIRINGS, RECIPES, RUN_KEYS,
                     SAMPLERS, SCHEDULES, SELECTIONS, RunConfig, WeightsError, build_model, check_finite_weights,
                     load_state, save_atomic)
from plots import plot_history
from predict import evaluate
from scoring import (SCORES, applicable_scores, autocast, embed_and_score, embedder, pick_device, resolve_score,
                     to_device)

STUDY = RunConfig()  # the study's settings: every default below comes from modules.RunConfig
DISTRIBUTED_TIMEOUT = datetime.timedelta(seconds=60)  # peers that never come: one line, not a hang
VALIDATION_GALLERY_CAP = 256  # gallery images per class when validating each epoch (0 = all would cost an epoch's time)
HISTORY_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_auc",
                   "active_fraction", "embedding_spread", "lr", "seconds"]
OUTPUT_FILES = ("best.pth", "last.pth", "history.csv", "training_validation_metrics.png", "gallery.pt",
                "excluded_images.txt", "near_copies.txt", "near_copies_left_out.txt")
RESUME_KEYS = ("model", "optimizer", "scaler", "config", "epoch", "step", "partial", "best", "history", "rng")


def by_recipe(name):
    """A lever's value under each recipe, for its help text: 'study: 1e-05; tuned: 0.001; ...'."""
    def shown(value):
        return f"{value:g}".replace("e-0", "e-") if isinstance(value, float) else value
    return "; ".join(f"{recipe}: {shown(values[name])}" for recipe, values in RECIPES.items())


def add_recipe_flags(p):
    """--recipe and the levers it sets (docs/training.md); a lever given explicitly overrides it.
    The recipes' values are written once, in modules.RECIPES; the help texts read them there."""
    group = p.add_argument_group("recipe and its levers")
    group.add_argument("--recipe", choices=tuple(RECIPES), default="study",
                       help="study: the design's settings (the default); tuned: the best Siamese setting found "
                            "on HAM10000 validation from random weights; transfer: for fine-tuning --weights "
                            "imagenet (docs/training.md). Each lever below lists its value under each recipe; "
                            "a lever given explicitly overrides the recipe")
    group.add_argument("--lr", type=float, default=None, help=f"peak learning rate ({by_recipe('lr')})")
    group.add_argument("--weight-decay", type=float, default=None, help=f"weight decay ({by_recipe('weight_decay')})")
    group.add_argument("--optimizer", choices=OPTIMIZERS, default=None,
                       help=f"adam: L2 penalty in the gradient, as the study; adamw: decoupled weight decay "
                            f"({by_recipe('optimizer')})")
    group.add_argument("--schedule", choices=SCHEDULES, default=None,
                       help=f"learning rate over the run after the warm-up: constant or cosine decay to 0 "
                            f"({by_recipe('schedule')})")
    group.add_argument("--warmup-epochs", type=float, default=None,
                       help=f"epochs of linear learning-rate warm-up from 0 ({by_recipe('warmup_epochs')})")
    group.add_argument("--augment", choices=AUGMENTATIONS, default=None,
                       help=f"study: the study's affine warp, crop and horizontal flip; dermoscopy: adds vertical "
                            f"flips, 90-degree rotations and colour jitter (it did not help on HAM10000, "
                            f"docs/results.md) ({by_recipe('augment')})")
    group.add_argument("--aux-weight", type=float, default=None,
                       help=f"bce: weight of an auxiliary malignant-vs-benign loss on the Siamese features, "
                            f"trained jointly with the pair BCE ({by_recipe('aux_weight')})")
    group.add_argument("--backbone-lr-scale", type=float, default=None,
                       help=f"the backbone's learning rate as a fraction of --lr, the head's being --lr; 0 freezes "
                            f"the backbone (its BatchNorm statistics too) and trains only what sits on it "
                            f"({by_recipe('backbone_lr_scale')})")
    group.add_argument("--sampler", choices=SAMPLERS, default=None,
                       help=f"bce/ce training batches: shuffled (every image once per epoch) or balanced (half "
                            f"malignant, so malignant images are not starved); contrastive and triplet always "
                            f"use balanced batches ({by_recipe('sampler')})")


def add_speed_flags(p):
    """Flags that change how fast a run goes, not what it computes."""
    group = p.add_argument_group("speed")
    group.add_argument("--workers", type=int, default=None,
                       help="DataLoader worker processes (default: from the CPU count, at most 8)")
    group.add_argument("--cache", metavar="DIR",
                       help="keep the images decoded and resized in a memory-mapped uint8 file under DIR, "
                            "built once and reused by later runs (rebuilt when the files or the size change)")
    group.add_argument("--no-amp", action="store_true",
                       help="disable mixed precision on CUDA (bf16, or fp16 with a scaler)")
    group.add_argument("--compile", action="store_true",
                       help="torch.compile the model (CUDA; slower start, faster steps)")
    group.add_argument("--sync-bn", action="store_true", help="DDP: synchronise BatchNorm statistics across processes")


def apply_recipe(args):
    """A lever not given on the command line takes the recipe's value."""
    for name, value in RECIPES[args.recipe].items():
        if getattr(args, name) is None:  # not given on the command line
            setattr(args, name, 0.0 if name == "aux_weight" and not LOSSES[args.loss].siamese_head else value)


def add_evaluation_flags(p):
    """How validation picks best.pth and how images are scored, after training and during it."""
    group = p.add_argument_group("evaluation")
    group.add_argument("--select", choices=SELECTIONS, default=STUDY.select,
                       help="what best.pth keeps: the highest validation AUC, or the lowest validation "
                            "pair loss (the study's rule)")
    group.add_argument("--gallery-size", type=int, default=None,
                       help=f"gallery images per class for image-level scores; 0 = every training image "
                            f"({by_recipe('gallery_size')}). Validation during training uses at most "
                            f"{VALIDATION_GALLERY_CAP} per class")
    group.add_argument("--score", "--classify", choices=SCORES, default="auto",
                       help="how an image's P(malignant) is computed: gallery, head-knn, knn, prototype or direct; "
                            "see predict.py --help (default auto: the loss's own; --classify is the old name)")
    group.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                       help=f"evaluate with features averaged over each image's four flips ({by_recipe('tta')})")
    group.add_argument("--k", type=int, default=STUDY.k, help=f"neighbours for --score knn and head-knn (default {STUDY.k})")
    group.add_argument("--target-sensitivity", type=float, default=None,
                       help="test threshold reaching this sensitivity on validation (default: Youden's J)")
    group.add_argument("--save-every", type=int, default=100, help="save every N-th test pair as a figure (default 100)")


def parse_args(argv=None):
    p = ArgumentParser("train.py", description=__doc__)
    p.add_argument("--project", required=True, help="folder for this run's outputs/ and results/")
    p.add_argument("--data", required=True, help="split folder made by to_subdirectories.py "
                                                 "(train_data, validation_data, test_data, each with 0/ and 1/)")
    p.add_argument("--epochs", type=int, default=None,
                   help="training epochs (study: 20; with --resume, a new total for the run)")
    p.add_argument("--batch-size", type=int, default=STUDY.batch_size,
                   help=f"training images per batch on each process (study: {STUDY.batch_size})")
    p.add_argument("--val-batch-size", type=int, default=STUDY.val_batch_size,
                   help=f"images per validation/test batch (study: {STUDY.val_batch_size})")
    add_recipe_flags(p)
    p.add_argument("--image-size", type=int, default=STUDY.image_size,
                   help=f"side of the square network input in pixels (study: {STUDY.image_size})")
    p.add_argument("--extra-train", nargs="+", default=[], metavar="FOLDER",
                   help="other labelled data sets to train on as well (each a split folder, all its splits, or "
                        "a folder with 0/ and 1/). Validation and test stay --data's, and its images "
                        "that are near copies of theirs are left out")
    p.add_argument("--benign-limit", type=int, nargs="+", default=STUDY.benign_limit, metavar="N",
                   help="cap on benign images in train, validation and test (one value: all three); "
                        "0 = no cap, the full data set (study: 4000 1000 1000)")
    p.add_argument("--backbone", choices=BACKBONES, default=STUDY.backbone,
                   help="resnet18 (the design, torchvision) or efficientnet_lite0 (timm; its ImageNet weights "
                        "install with pip, no download at run time)")
    p.add_argument("--features", choices=FEATURES, default=STUDY.features,
                   help="what the backbone hands the head: imagenet, its 1000-d ImageNet output (the design), or "
                        "pooled, the pooled features before it (512-d ResNet18, 1280-d EfficientNet-Lite0)")
    p.add_argument("--weights", default=STUDY.weights,
                   help="backbone start: imagenet (ResNet18: torchvision, downloaded once; EfficientNet-Lite0: "
                        "the pip package, offline), none (random), or a .pth path")
    p.add_argument("--loss", choices=LOSSES, default=STUDY.loss,
                   help="bce: the design's Siamese pairs; contrastive / triplet: metric learning on an "
                        "L2-normalised embedding; ce: plain classifier baseline (class-weighted BCE)")
    p.add_argument("--pairing", choices=PAIRINGS, default=STUDY.pairing,
                   help="bce only. embed-once: each batch image passes the backbone once and the design's "
                        "pairs are drawn inside the batch; two-pass: the study's pair dataset, two passes per pair")
    p.add_argument("--partners-per-class", type=int, default=STUDY.partners_per_class,
                   help="embed-once: a batch with fewer images of a class than this is topped up with random "
                        "images of that class that serve only as partners (default 8)")
    p.add_argument("--embed-dim", type=int, default=STUDY.embed_dim,
                   help=f"contrastive/triplet embedding size (default {STUDY.embed_dim})")
    p.add_argument("--margin", type=float, default=None,
                   help="contrastive/triplet margin (default: 0.5 contrastive, 0.2 triplet)")
    p.add_argument("--miner", choices=MINERS, default=None,
                   help="contrastive/triplet miner (default: semihard for triplet, all pairs for contrastive)")
    p.add_argument("--per-class", type=int, default=None,
                   help="contrastive/triplet: images of each class per batch (default batch-size / 2)")
    add_evaluation_flags(p)
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    p.add_argument("--seed", type=int, default=STUDY.seed, help="fixes the benign subset, pairs, initialisation and sampling")
    add_speed_flags(p)
    p.add_argument("--resume", action="store_true", help="continue from PROJECT/outputs/last.pth with its saved settings")
    p.add_argument("--accept-changed-data", action="store_true",
                   help="with --resume: continue although --data's images changed since the run began (refused "
                        "otherwise)")
    p.add_argument("--force", action="store_true", help="start over in a project that already holds outputs (deletes them)")
    args = p.parse_args(argv)
    # The flags typed on the command line, not defaulted: --resume refuses a typed flag that would
    # change the saved run instead of ignoring it. argparse fills in a default only where the
    # namespace it is given lacks the name, so a second parse into a namespace of markers tells.
    unset = object()
    typed = p.parse_args(argv, argparse.Namespace(**dict.fromkeys(vars(args), unset)))
    args.given = {name for name, value in vars(typed).items() if value is not unset}
    apply_recipe(args)
    return args


def check_args(args):
    """Bad flags end here, before any work, with one line each: the paths, the flags the config
    does not keep, the combinations of flags, then every setting by its own rule (check_settings)."""
    if not Path(args.data).is_dir():
        raise ValueError(f"--data {args.data}: no such folder; make it with to_subdirectories.py "
                         f"or `python synthetic.py --synthetic {args.data}`")
    for folder in args.extra_train:
        if not Path(folder).is_dir():
            raise ValueError(f"--extra-train {folder}: no such folder; make it with to_subdirectories.py")
    problem = folder_problem(args.project)
    if problem:
        raise ValueError(f"--project {args.project}: {problem}; choose another --project")
    if overlaps(args.project, args.data):  # its results/ would move inside (or with) the data
        raise ValueError(f"--project {args.project}: overlaps --data {args.data}; choose a project folder "
                         f"outside the data")
    if args.save_every < 1:
        raise ValueError(f"--save-every {args.save_every}: must be at least 1")
    if args.workers is not None and args.workers < 0:
        raise ValueError(f"--workers {args.workers}: must be 0 or more")
    if args.target_sensitivity is not None and not 0 < args.target_sensitivity <= 1:
        raise ValueError(f"--target-sensitivity {args.target_sensitivity}: must be in (0, 1]")
    if len(args.benign_limit) not in (1, 3) or min(args.benign_limit) < 0:
        raise ValueError("--benign-limit takes one value or three (train validation test), each 0 or more")
    if args.aux_weight > 0 and (not LOSSES[args.loss].siamese_head or args.pairing != "embed-once"):
        raise ValueError("--aux-weight trains a classifier on the Siamese features: it needs --loss bce "
                         "with --pairing embed-once")
    if args.resume and args.force:
        raise ValueError("--resume and --force contradict each other; pick one")
    check_settings(make_config(args))  # make_config raises for a --score the loss cannot give


def check_settings(config):
    """Each setting of the config the flags built, by its rule in modules.CONFIG_RULES (the one
    place the rules live; checkpoints are checked by the same), named by its flag."""
    for key, (valid, what) in CONFIG_RULES.items():
        value = getattr(config, key)
        if not valid(value):
            shown = " ".join(map(str, value)) if isinstance(value, list) else value  # as typed
            raise ValueError(f"--{key.replace('_', '-')} {shown}: must be {what}")


def make_config(args):
    """The RunConfig the flags describe: each setting from the flag of its name (a flag left out
    takes its recipe's or the study's value), except those that follow from the loss."""
    loss = LOSSES[args.loss]
    derived = {
        "pairing": args.pairing if loss.siamese_head else None,
        "epochs": STUDY.epochs if args.epochs is None else args.epochs,
        "benign_limit": list(args.benign_limit * 3 if len(args.benign_limit) == 1 else args.benign_limit),
        "margin": loss.margin if args.margin is None else args.margin,
        "miner": args.miner or loss.miner,
        "per_class": max(2, args.batch_size // 2) if args.per_class is None else args.per_class,
        "score": resolve_score(RunConfig(loss=args.loss, aux_weight=args.aux_weight), args.score),
        "sampler": loss.sampler or args.sampler,
        "data": str(Path(args.data).resolve()),
        "extra_train": [str(Path(folder).resolve()) for folder in args.extra_train],
    }
    return RunConfig(**{setting.name: derived[setting.name] if setting.name in derived else getattr(args, setting.name)
                        for setting in fields(RunConfig)})


def setup_distributed(device_name):
    """(rank, world_size, device). torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; then DDP over NCCL
    on GPUs or gloo on CPUs, one process per GPU."""
    if "RANK" not in os.environ:
        return 0, 1, pick_device(device_name)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device_name.startswith("cuda:"):
        raise ValueError(f"--device {device_name}: under torchrun each process takes the GPU of its LOCAL_RANK; "
                         f"pass --device cuda (or auto) and choose GPUs with CUDA_VISIBLE_DEVICES")
    if device_name in ("auto", "cuda") and torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = pick_device("cpu" if device_name == "auto" else device_name)
    # Outside torchrun (the variables set by hand, or left over) a missing peer would hang for
    # the default half hour; torchrun's own rendezvous waits for peers, and its runs keep the
    # default timeout, which a long step (rank 0 building the --cache) needs.
    timeout = None if "TORCHELASTIC_RUN_ID" in os.environ else DISTRIBUTED_TIMEOUT
    try:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    except (RuntimeError, dist.DistError) as error:  # e.g. RANK and WORLD_SIZE left over in the environment
        names = ", ".join(f"{key}={os.environ.get(key)}" for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))
        raise ValueError(f"the distributed environment ({names}) found no peers within "
                         f"{DISTRIBUTED_TIMEOUT.seconds} s ({type(error).__name__}); start one process per rank with "
                         f"torchrun, or unset these variables to train in one process") from None
    return dist.get_rank(), dist.get_world_size(), device


@dataclass
class RunContext:
    """This process's place in the run: its rank of world_size (1 without torchrun), its device,
    the project's outputs folder and its DataLoader workers. Rank 0 writes the files and prints."""
    rank: int
    world_size: int
    device: torch.device
    outputs: Path
    workers: int

    def say(self, *args, **kwargs):
        if self.rank == 0:
            print(*args, **kwargs)

    def sum(self, values):
        """A list of floats summed over all processes."""
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            dist.all_reduce(tensor)
        return tensor.tolist()


def default_workers(world_size=1):
    """DataLoader workers per process when --workers is not given: the cores left to each process
    after its own, from 1 to 8."""
    return min(8, max(1, (os.cpu_count() or 2) // world_size - 1))


def run_context(args, rank, world_size, device):
    workers = args.workers if args.workers is not None else default_workers(world_size)
    return RunContext(rank, world_size, device, Path(args.project) / "outputs", workers)


def make_train_loader(train, config, ctx):
    """The training batches of this process (ctx: its rank, world size, workers and device): the
    study's pair dataset (two-pass) or single images (the rest)."""
    seed, rank, world_size, workers = config.seed, ctx.rank, ctx.world_size, ctx.workers
    dataset_class = PairDataset if config.pairing == "two-pass" else ImageDataset
    dataset = dataset_class(train, train_transform(config.image_size, config.augment), seed, augment=True)
    if config.sampler == "balanced":
        sampler = BalancedBatches(train.labels, config.per_class, seed, rank=rank, world_size=world_size)
    else:
        partners = config.partners_per_class if config.pairing == "embed-once" else 0
        sampler = ShuffledBatches(train.labels, config.batch_size, seed, partners, rank=rank, world_size=world_size)
    collate = None if config.pairing == "two-pass" else collate_images
    # Its own generator: starting an epoch must not draw from the global RNG that dropout uses,
    # or a resumed run would drift from an uninterrupted one. Augmentation is seeded per image.
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate,
                        pin_memory=ctx.device.type == "cuda", persistent_workers=workers > 0,
                        generator=torch.Generator().manual_seed(config.seed))
    return sampler, loader


def training_loss(model, batch, config, device, generator, criterion, pos_weight):
    """The BatchResult of one batch (modules.LOSSES): the loss's batch_loss on the design's pairs
    drawn inside the batch, or, with --pairing two-pass, its two_pass_loss on the study's pairs."""
    if config.pairing == "two-pass":  # PairDataset batches: (first images, second images, targets)
        first, second, targets = batch
        return LOSSES[config.loss].two_pass_loss(model, to_device(first, device), to_device(second, device),
                                                 targets.to(device).float())
    images, labels, is_anchor = batch
    pairs = tuple(t.to(device) for t in batch_pairs(labels, is_anchor, generator))
    return LOSSES[config.loss].batch_loss(model, to_device(images, device), labels.to(device), pairs, config,
                                             criterion, pos_weight)


@torch.no_grad()
def validate(model, train, validation, config, ctx, amp):
    """Validation pair loss and accuracy (the design's fixed pairs) and image-level AUC, from
    scoring.embed_and_score: the same code that evaluates the test split."""
    embed = embedder(model, config.image_size, config.val_batch_size, ctx.device, ctx.workers, amp, ctx.rank,
                     ctx.world_size)
    per_class = min(config.gallery_size or VALIDATION_GALLERY_CAP, VALIDATION_GALLERY_CAP)
    _, scored = embed_and_score(model, train, {"validation": validation}, per_class, config.score, config.k,
                                config.seed, embed)
    scored = scored["validation"]
    spread = (scored.features - scored.features.mean(0)).norm(dim=1).mean().item()
    return {"val_loss": scored.pair_summary["pair_loss"], "val_acc": scored.pair_summary["pair_accuracy"],
            "val_auc": auc_or_nan(validation.labels, scored.scores), "embedding_spread": spread}


def collapse_warning(row):
    """A warning when an epoch's embeddings have collapsed (all alike, or nothing left active)."""
    if row["embedding_spread"] < 1e-3 or row["active_fraction"] == 0:
        return (f"WARNING: the embeddings look collapsed at epoch {row['epoch']} (spread "
                f"{row['embedding_spread']:.2e}, active {row['active_fraction']:.3f}); lower --lr, change "
                f"--margin or --miner, or use more images per class (--per-class)")
    return None


def learning_rate(step, total_steps, config):
    """The learning rate at a global step: linear warm-up from 0, then constant or cosine decay to 0."""
    warmup = config.warmup_epochs * total_steps / config.epochs
    if step < warmup:
        return config.lr * (step + 1) / warmup
    if config.schedule == "constant":
        return config.lr
    progress = (step - warmup) / max(1.0, total_steps - warmup)
    return config.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


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


def rng_state():
    """Plain values and tensors only, so last.pth loads with weights_only=True. numpy's global
    generator is not saved: nothing here draws from it (samplers own seeded generators)."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_outputs(outputs, args):
    """Refuse to overwrite an earlier run's outputs unless --resume or --force says what to do.
    Returns the files --force will delete (once the data have been checked)."""
    found = [name for name in OUTPUT_FILES if (outputs / name).exists()]
    if args.resume and not (outputs / "last.pth").exists():
        raise ValueError(f"--resume: {outputs / 'last.pth'} does not exist; start without --resume")
    if found and not (args.resume or args.force):
        raise ValueError(f"{outputs} already holds {', '.join(found)}; pass --resume to continue that run, "
                         f"--force to delete it and start over, or choose another --project")
    return found if args.force else []


def saved_so_far(outputs):
    """What a stopped run leaves on disk, for its message: only files that are there."""
    kept = [f"{outputs / name} {what}" for name, what in (("best.pth", "keeps the best model so far"),
                                                          ("last.pth", "holds the last saved state"))
            if (outputs / name).exists()]
    return "; ".join(kept) if kept else f"no checkpoint was saved yet in {outputs}"


def lock_project(project, ctx):
    """One run owns a project at a time: rank 0 holds an advisory lock on PROJECT/.lock for the
    whole run (the OS releases it when the process ends, even after kill -9), and a second run on
    the same project stops at once, naming the first one's pid. Returns the open lock file."""
    path, file, holder = Path(project) / ".lock", None, None
    if ctx.rank == 0 and fcntl is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        file = open(path, "a+")
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            file.truncate(0)
            file.write(f"{os.getpid()}\n")
            file.flush()
        except BlockingIOError:
            file.seek(0)
            holder = file.read().strip() or "unknown"
            file.close()
    if ctx.sum([holder is not None])[0]:
        raise ValueError(f"{path}: another train.py run (pid {holder or 'on rank 0'}) is using --project "
                         f"{project}; wait for it to end, or choose another --project")
    return file


def check_resume(state, path):
    """last.pth as train.py writes it (keys, config, finite weights), else one line naming it.
    Returns its RunConfig."""
    missing = [key for key in RESUME_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise WeightsError(f"--resume {path}: not a last.pth written by train.py (no {', '.join(missing)}); "
                           f"start over with --force")
    config = RunConfig.from_dict(state["config"], path, RUN_KEYS)
    for key in ("epoch", "step"):
        if not (isinstance(state[key], int) and state[key] >= 0):
            raise WeightsError(f"--resume {path}: {key} = {state[key]!r} is not a count; the file was edited or "
                               f"damaged, start over with --force")
    check_finite_weights(state["model"], path)
    return config


def apply_resume_flags(args, config, epochs_done, say):
    """--resume continues the saved run with its settings. --epochs sets a new total and is applied
    (and said so); another setting typed with a different value is refused, never ignored."""
    typed = argparse.Namespace(**{**vars(args), "loss": args.loss if "loss" in args.given else config.loss})
    wanted = make_config(typed)  # the typed flags as the config would hold them
    for flag in sorted(args.given - {"epochs", "data"}):
        if hasattr(config, flag) and getattr(wanted, flag) != getattr(config, flag):
            value = getattr(args, flag)
            value = " ".join(map(str, value)) if isinstance(value, list) else value  # as typed
            raise ValueError(f"--{flag.replace('_', '-')} {value}: the resumed run has "
                             f"{getattr(config, flag)!r} (saved in last.pth), and --resume keeps its settings (only "
                             f"--epochs changes); drop the flag, or start a new run with --force or another --project")
    if args.epochs and args.epochs != config.epochs:
        if args.epochs < epochs_done:
            raise ValueError(f"--epochs {args.epochs}: the resumed run has finished {epochs_done} epochs already")
        say(f"--epochs {args.epochs}: applied (the run was set to {config.epochs})")
        config.epochs = args.epochs


def first_missing_folder(path):
    """The outermost folder on the way to `path` that does not exist yet, i.e. the one this run
    creates (None when `path` exists): what to remove if the run fails before it starts."""
    path, missing = Path(path).absolute(), None
    while not path.exists():
        path, missing = path.parent, path
    return missing


def stop_handler(stop):
    """SIGINT / SIGTERM: note it; the loop finishes the step, saves and exits. A second one stops at once."""
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


class StopForResume(Exception):
    """A signal stopped the run once last.pth held its state; main says how to continue and exits
    with 128 + the signal's number, as a process killed by it would."""

    def __init__(self, signum, message):
        super().__init__(message)
        self.signum = signum


@dataclass
class RunState:
    """Where a run stands; last.pth saves it beside the weights, optimizer and config."""
    epoch: int = 0          # complete epochs
    step: int = 0           # steps done of the next epoch (a run stopped inside it)
    partial: list = None    # that epoch's EpochTotals so far, over all ranks, as a list
    best: list = None       # selection_key of the model in best.pth
    history: list = field(default_factory=list)


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


@dataclass
class Training:
    """What the epochs step: the model (raw_model unwrapped, model as called: DDP or compiled),
    its optimizer and gradient scaler, the batches and the loss's criterion."""
    raw_model: torch.nn.Module
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    sampler: ShuffledBatches | BalancedBatches
    loader: DataLoader
    criterion: tuple | None  # (loss function, miner) of a metric loss (Loss.criterion)
    pos_weight: torch.Tensor
    steps_per_epoch: int
    amp: bool  # mixed precision on CUDA (--no-amp turns it off)
    data: dict  # the images it trains and validates on (data_fingerprint), saved in last.pth


def main(argv=None):
    args = parse_args(argv)
    try:
        check_args(args)
        ctx = run_context(args, *setup_distributed(args.device))
    except ValueError as error:
        sys.exit(f"train.py: error: {error}")
    stop = {"signal": None}
    previous = {s: signal.signal(s, stop_handler(stop)) for s in (signal.SIGINT, signal.SIGTERM)}
    lock = None
    created = first_missing_folder(Path(args.project) / "outputs")
    lock_path = Path(args.project) / ".lock"
    new_lock = not lock_path.exists()
    try:
        check_outputs(Path(args.project) / "outputs", args)  # before the lock: a refused run creates nothing
        lock = lock_project(args.project, ctx)
        run(args, ctx, stop)
    except StopForResume as stopped:
        ctx.say(stopped)
        sys.exit(128 + stopped.signum)
    except Interrupted as stopped:  # during the final evaluation, on rank 0
        print(f"train.py: stopped by {signal.Signals(stopped.signum).name} during the evaluation; "
              f"{getattr(stopped, 'note', 'nothing was written')}. Training is complete; evaluate again with: "
              f"python predict.py --project {shlex.quote(str(args.project))} --data {shlex.quote(str(args.data))}",
              file=sys.stderr)
        sys.exit(128 + stopped.signum)
    except WeightsError as error:  # e.g. no network for --weights imagenet: leave no empty project behind
        if ctx.rank == 0 and created is not None and not any(created.rglob("*.pth")):
            shutil.rmtree(created, ignore_errors=True)
        if ctx.rank == 0 and new_lock and lock is not None:  # in a folder that existed, the lock file is ours
            lock_path.unlink(missing_ok=True)
        sys.exit(f"train.py: error: {error}")
    except (ValueError, DataError) as error:
        sys.exit(f"train.py: error: {error}")
    except (MemoryError, RuntimeError) as error:  # CUDA's OutOfMemoryError; the CPU's "can't allocate memory"
        if not isinstance(error, (MemoryError, torch.cuda.OutOfMemoryError)) and "allocate" not in str(error):
            raise
        reason = (str(error).splitlines() or [type(error).__name__])[0][:100]
        if args.resume:  # its sizes are last.pth's, and --resume keeps them
            sys.exit(f"train.py: error: out of memory resuming {args.project} ({reason}); its --image-size and "
                     f"--batch-size need more memory than this machine has: start a new run with lower ones")
        sys.exit(f"train.py: error: out of memory at --image-size {args.image_size} and --batch-size "
                 f"{args.batch_size} ({reason}); lower --batch-size or --image-size")
    except OSError as error:
        last = Path(args.project) / "outputs" / "last.pth"
        advice = (f"rerun with --resume: {last} holds the last complete state" if last.is_file() else
                  "no checkpoint was saved, so rerun as before")
        sys.exit(f"train.py: error: could not write {error.filename or 'a file'} ({error.strerror or error}); "
                 f"free disk space or fix permissions (or choose another path), then {advice}")
    finally:
        if lock is not None:
            lock.close()  # releases the project
        restore_signal_handlers(previous)
        if dist.is_initialized():
            dist.destroy_process_group()


def run(args, ctx, stop):
    """Set up, train epoch by epoch (validating and saving after each), then evaluate best.pth."""
    started = time.time()
    to_delete = check_outputs(ctx.outputs, args)  # on every rank, so a refusal stops all of them
    config, resume = run_config(args, ctx)
    torch.manual_seed(config.seed)
    splits = load_data(args, config, ctx)
    if resume:
        check_same_data(resume.get("data"), data_fingerprint(splits), args.accept_changed_data)
    # the weights (--weights PATH or imagenet) load before --force deletes anything: a typo costs nothing
    raw_model = build_model(config, weights="none" if resume else None).to(ctx.device)  # resume: from last.pth
    leaked = prepare_outputs(to_delete, splits, ctx)
    training, state = build_training(args, config, raw_model, splits, resume, ctx)
    if resume:
        ctx.say(f"resuming {ctx.outputs / 'last.pth'} at epoch {state.epoch + 1}, step {state.step}")

    for epoch in range(state.epoch, config.epochs):
        epoch_started = time.time()
        totals, stopped_at = train_one_epoch(training, config, epoch, state, stop, ctx)
        if stopped_at is not None:
            save_last(training, config, RunState(epoch, stopped_at, totals.as_list(), state.best, state.history), ctx)
            raise StopForResume(stop["signal"] or signal.SIGINT, resume_message(args, ctx.outputs, epoch, stopped_at))
        validate_and_save(training, config, epoch, totals, epoch_started, state, splits, ctx)
        if ctx.sum([stop["signal"] is not None])[0]:  # any rank signalled: all stop
            raise StopForResume(stop["signal"] or signal.SIGINT, resume_message(args, ctx.outputs, epoch + 1, 0))

    # training is complete: a signal now stops the evaluation as it stops predict.py's, putting
    # back what it moved aside
    stop_evaluation = interrupt_handler()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop_evaluation)
    if ctx.world_size > 1:
        dist.barrier()
    if ctx.rank == 0:
        evaluate_best(args, config, splits, state.history, ctx, training.amp, started, leaked)


def restore_signal_handlers(previous):
    for s, handler in previous.items():
        signal.signal(s, handler)


def resume_message(args, outputs, epochs_done, steps_done):
    return (f"stopped after {epochs_done} complete epoch(s) and {steps_done} step(s) of the next; "
            f"{outputs / 'last.pth'} holds that state. Continue with:\n"
            f"  python train.py --project {shlex.quote(str(args.project))} --data {shlex.quote(str(args.data))} "
            f"--resume")


def run_config(args, ctx):
    """(config, last.pth's state or None): a new run's config from the flags, or the resumed run's."""
    if not args.resume:
        return make_config(args), None
    resume = load_state(ctx.outputs / "last.pth", "--resume")
    config = check_resume(resume, ctx.outputs / "last.pth")  # a setting added since the run began: the study's
    config.data = str(Path(args.data).resolve())  # the data may have moved since the run began
    apply_resume_flags(args, config, resume["epoch"], ctx.say)
    return config, resume


def load_data(args, config, ctx):
    """{train, validation[, test]} with their benign limits, cached when --cache is given."""
    workers, (train_limit, *held_out_limits) = max(ctx.workers, 4), config.benign_limit
    splits = {"train": load_train_split(args.data, config.extra_train, train_limit, config.seed, workers)}
    splits |= {name: load_split(args.data, name, limit, config.seed, workers)
               for name, limit in zip(("validation", "test"), held_out_limits)
               if name != "test" or has_split(args.data, "test")}
    if "test" not in splits:
        ctx.say(f"{args.data}: no test_data folder; the final evaluation reports the validation split instead")
    if args.cache:  # rank 0 builds the cache (once); the other ranks wait for it, then map it
        if ctx.rank > 0:
            dist.barrier()
        for split in splits.values():
            attach_cache(split, args.cache, config.image_size, ctx.workers)
        if ctx.rank == 0 and ctx.world_size > 1:
            dist.barrier()
    return splits


def prepare_outputs(to_delete, splits, ctx):
    """--force deletes the earlier run now that the data are known to be usable; then the list
    of excluded images, the counts, and the near copies across splits or classes (returned)."""
    if ctx.rank == 0:
        for name in to_delete:
            (ctx.outputs / name).unlink()
        ctx.outputs.mkdir(parents=True, exist_ok=True)
        stale = remove_stale_temporaries(ctx.outputs)  # the project's lock says no other run writes here
        if stale:
            ctx.say(f"removed {len(stale)} temporary file(s) a killed run left in {ctx.outputs}: {', '.join(stale)}")
    if ctx.world_size > 1:
        dist.barrier()
    excluded = write_excluded(splits.values(), ctx.outputs / "excluded_images.txt") if ctx.rank == 0 else 0
    if excluded:
        ctx.say(f"excluded {excluded} unusable image file(s); the list is in {ctx.outputs / 'excluded_images.txt'}")
    for name, split in splits.items():
        benign, malignant = split.counts()
        ctx.say(f"{name:<10} {benign:>6} benign {malignant:>5} malignant")
    leaked = leaks({name: (split.paths, split.labels) for name, split in splits.items()},
                   max(1, ctx.workers)) if ctx.rank == 0 else []
    if leaked:
        write_text_atomic(ctx.outputs / "near_copies.txt",
                          "".join(f"{what}\t{a}\t{b}\t{bits} bits\n" for what, a, b, bits in leaked))
        counts = Counter(what for what, *_ in leaked)
        ctx.say(f"warning: near copies of one image: {', '.join(f'{what} {n}' for what, n in counts.items())}; "
                f"an evaluation that meets its training images is optimistic. Listed in "
                f"{ctx.outputs / 'near_copies.txt'}; to_subdirectories.py leaves such copies out of training")
    train = splits["train"]
    for folder, count in train.extra.items():
        ctx.say(f"  of which {count} from --extra-train {folder}")
    if train.dropped and ctx.rank == 0:
        write_text_atomic(ctx.outputs / "near_copies_left_out.txt",
                          "".join(f"{extra}\t{held_out}\t{bits} bits\n" for extra, held_out, bits in train.dropped))
        ctx.say(f"left out {len(train.dropped)} --extra-train image(s) that are near copies of validation or test "
                f"images; the list is in {ctx.outputs / 'near_copies_left_out.txt'}")
    return leaked


def data_fingerprint(splits):
    """{split: {images, digest}}: how many images each split has, and a sha256 of their class
    folders and file names (not their full paths: data that moved is the same data)."""
    return {name: {"images": len(split), "digest": hashlib.sha256("\n".join(
        sorted(f"{Path(path).parent.name}/{Path(path).name}" for path in split.paths)).encode()).hexdigest()}
        for name, split in splits.items()}


def check_same_data(saved, now, accept):
    """--resume continues on the images the run began on: a split that gained, lost or swapped
    images is refused in one line naming it, unless --accept-changed-data. A last.pth written
    before runs recorded their data (saved None) is taken as it is."""
    if saved is None or saved == now or accept:
        return
    changes = []
    for name in sorted(set(saved) | set(now)):
        before, after = saved.get(name, {"images": 0}), now.get(name, {"images": 0})
        if before["images"] != after["images"]:
            changes.append(f"{name} has {after['images']} images, the run began with {before['images']}")
        elif before.get("digest") != after.get("digest"):
            changes.append(f"{name} holds other images (as many as before)")
    raise ValueError(f"--resume: --data is not the data the run began on ({'; '.join(changes)}); resume on the "
                     f"data it began on, or pass --accept-changed-data to continue on these images anyway "
                     f"(its validation scores would compare different images)")


def build_training(args, config, raw_model, splits, resume, ctx):
    """(Training, RunState): the model's optimizer, scaler and batches, fresh or from last.pth."""
    device, world_size = ctx.device, ctx.world_size
    if device.type == "cuda":
        raw_model = raw_model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick its fastest kernels
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    optimizer_class = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    optimizer = optimizer_class(parameter_groups(raw_model, config.backbone_lr_scale), lr=config.lr,
                                weight_decay=config.weight_decay)
    use_scaler = device.type == "cuda" and not args.no_amp and not torch.cuda.is_bf16_supported()
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    state = RunState()
    if resume:
        restore(resume, raw_model, optimizer, scaler if use_scaler else None, config, ctx.outputs)
        state = RunState(resume["epoch"], resume["step"], resume["partial"], resume["best"], resume["history"])
    model = raw_model
    if world_size > 1:
        if config.sync_bn and device.type != "cuda":
            raise ValueError("--sync-bn: SyncBatchNorm works on CUDA devices only; drop the flag on the CPU")
        if config.sync_bn:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        model = torch.compile(model)
    train = splits["train"]
    benign, malignant = train.counts()
    # ce and the auxiliary loss: malignant errors weigh as much as benign ones (balanced batches already do that)
    pos_weight = torch.tensor(1.0 if config.sampler == "balanced" else benign / malignant, device=device)
    sampler, loader = make_train_loader(train, config, ctx)
    if len(sampler) == 0:
        raise ValueError(f"--batch-size {config.batch_size} on {world_size} process(es) leaves no training batch "
                         f"for {len(train)} training images; lower --batch-size")
    criterion = LOSSES[config.loss].criterion(config, world_size)
    return Training(raw_model, model, optimizer, scaler, sampler, loader, criterion, pos_weight,
                    len(sampler.batches()), not args.no_amp, data_fingerprint(splits)), state


def parameter_groups(model, backbone_lr_scale):
    """The optimizer's parameter groups, each with the fraction of the learning rate it takes
    ("lr_scale"): the backbone's and the rest. Scale 0 freezes the backbone: it is left out."""
    if backbone_lr_scale == 1:  # one group, as runs saved before the scale existed
        return [{"params": list(model.parameters()), "lr_scale": 1.0}]
    backbone = list(model.backbone.parameters())
    rest = [p for name, p in model.named_parameters() if not name.startswith("backbone.")]
    if backbone_lr_scale == 0:
        for parameter in backbone:
            parameter.requires_grad_(False)
        return [{"params": rest, "lr_scale": 1.0}]
    return [{"params": backbone, "lr_scale": backbone_lr_scale}, {"params": rest, "lr_scale": 1.0}]


def restore(resume, raw_model, optimizer, scaler, config, outputs):
    """last.pth's weights, optimizer (and scaler) state and random streams."""
    try:
        raw_model.load_state_dict(resume["model"])
        scales = [group["lr_scale"] for group in optimizer.param_groups]
        optimizer.load_state_dict(resume["optimizer"])  # replaces the groups: a last.pth from before the
        for group, scale in zip(optimizer.param_groups, scales):  # backbone's scale existed has none
            group["lr_scale"] = scale
    except (RuntimeError, ValueError, KeyError, TypeError):
        raise WeightsError(f"--resume {outputs / 'last.pth'}: its weights or optimizer state do not fit the "
                           f"{config.loss} model its config describes; the file was edited or mixed up, "
                           f"start over with --force") from None
    if resume["scaler"] and scaler is not None:
        scaler.load_state_dict(resume["scaler"])
    set_rng_state(resume["rng"])


def save_last(training, config, state, ctx):
    """last.pth: everything --resume needs to continue exactly where the run is (rank 0 writes)."""
    if ctx.rank == 0:
        save_atomic({"model": training.raw_model.state_dict(), "optimizer": training.optimizer.state_dict(),
                     "scaler": training.scaler.state_dict(), "config": config.as_dict(), "epoch": state.epoch,
                     "step": state.step, "partial": state.partial, "best": state.best,
                     "history": state.history, "rng": rng_state(), "data": training.data}, ctx.outputs / "last.pth")


def train_one_epoch(training, config, epoch, state, stop, ctx):
    """One epoch (or the rest of a resumed one). Returns (its EpochTotals over all ranks, the step
    a signal stopped it at or None)."""
    steps_per_epoch = training.steps_per_epoch
    first_step = state.step if epoch == state.epoch else 0
    # a resumed epoch's saved totals are already sums over ranks: rank 0 alone starts from them
    resumed = epoch == state.epoch and state.partial and ctx.rank == 0
    totals = EpochTotals(*state.partial) if resumed else EpochTotals()
    training.sampler.set_epoch(epoch, first_step)
    training.model.train()
    if config.backbone_lr_scale == 0:  # frozen: its BatchNorm statistics stay the pretrained ones
        training.raw_model.backbone.eval()
    bar = progress(training.loader, f"epoch {epoch + 1}/{config.epochs}", disable=ctx.rank != 0,
                   initial=first_step, total=first_step + len(training.sampler), leave=False)
    metric = LOSSES[config.loss].metric
    for step, batch in enumerate(bar, start=first_step + 1):
        for group in training.optimizer.param_groups:
            group["lr"] = group["lr_scale"] * learning_rate(epoch * steps_per_epoch + step - 1,
                                                            config.epochs * steps_per_epoch, config)
        generator = torch.Generator().manual_seed(sample_seed(config.seed + 1, epoch, step))
        with autocast(ctx.device, training.amp):
            result = training_loss(training.model, batch, config, ctx.device, generator, training.criterion,
                                   training.pos_weight)
        # pytorch-metric-learning's DDP wrapper scales the loss by the world size (see metric_loss)
        loss_value = result.loss.item() / (ctx.world_size if metric else 1)
        # Checked before the update (so no NaN reaches the weights) and agreed by every process,
        # so all of them stop together instead of some waiting in DDP's gradient all-reduce.
        bad, stopping = ctx.sum([not math.isfinite(loss_value), stop["signal"] is not None])
        if bad:
            raise ValueError(f"the training loss became non-finite ({loss_value} on this process) at epoch "
                             f"{epoch + 1}, step {step}; lower --lr or try --no-amp. {saved_so_far(ctx.outputs)}")
        training.optimizer.zero_grad(set_to_none=True)
        training.scaler.scale(result.loss).backward()
        training.scaler.step(training.optimizer)
        training.scaler.update()
        totals.update(loss_value, result)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{totals.loss / totals.count:.4f}", acc=f"{totals.correct / totals.count:.3f}",
                            refresh=False)
        if stopping:
            return totals.summed_over_processes(ctx), step
    bar.close()
    return totals.summed_over_processes(ctx), None


def validate_and_save(training, config, epoch, totals, started, state, splits, ctx):
    """The epoch's row of history.csv (training totals, validation), best.pth when it improved,
    then last.pth, history.csv and the curves. Updates `state`."""
    metric = LOSSES[config.loss].metric
    row = {"epoch": epoch + 1, "train_loss": totals.loss / totals.count, "train_acc": totals.correct / totals.count,
           "active_fraction": totals.active / totals.steps if metric else math.nan,
           "lr": training.optimizer.param_groups[-1]["lr"]}  # the head's (the backbone's may be scaled)
    if ctx.world_size > 1:  # every rank validates rank 0's BatchNorm statistics, the model best.pth holds
        for buffer in training.raw_model.buffers():
            dist.broadcast(buffer, 0)
    try:
        row.update(validate(training.raw_model, splits["train"], splits["validation"], config, ctx, training.amp))
    except ValueError as error:  # diverged: say what is on disk
        raise ValueError(f"{error}. {saved_so_far(ctx.outputs)}") from None
    row["seconds"] = time.time() - started
    state.history.append(row)
    ctx.say(f"epoch {epoch + 1:>3}/{config.epochs}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.3f}  "
            f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.3f} AUC {row['val_auc']:.3f}  "
            f"({row['seconds']:.0f}s)")
    if metric and collapse_warning(row):
        ctx.say(collapse_warning(row))
    key = selection_key(row, config.select)
    best = ctx.outputs / "best.pth"
    if state.best is None or key > state.best:
        state.best = key
        if ctx.rank == 0:
            save_atomic({"model": training.raw_model.state_dict(), "config": config.as_dict(), "epoch": epoch + 1,
                         "select": config.select, "select_value": row[config.select]}, best)
        ctx.say(f"  best {config.select} so far ({row[config.select]:.4f}): saved {best}")
    state.epoch, state.step, state.partial = epoch + 1, 0, None
    save_last(training, config, state, ctx)  # first: a history.csv listing epoch k means last.pth holds it
    if ctx.rank == 0:
        write_history(state.history, ctx.outputs / "history.csv")
        plot_history(state.history, ctx.outputs / "training_validation_metrics.png",
                     selected_epoch(state.history, config.select))


def evaluate_best(args, config, splits, history, ctx, amp, started, leaked=()):
    """predict.evaluate of best.pth on the test split (or validation) into PROJECT/results."""
    evaluated = splits.get("test", splits["validation"])
    print(f"\nevaluating {ctx.outputs / 'best.pth'} on the {evaluated.name} split")
    best_row = next(row for row in history if row["epoch"] == selected_epoch(history, config.select))
    evaluate(ctx.outputs / "best.pth", config.data, Path(args.project) / "results", gallery_size=config.gallery_size,
             score=[config.score, *applicable_scores(config)], k=config.k,
             target_sensitivity=args.target_sensitivity, save_every=args.save_every,
             batch_size=config.val_batch_size, device=ctx.device, workers=ctx.workers,
             splits={"train": splits["train"], "validation": splits["validation"], "evaluated": evaluated}, amp=amp,
             started=started, summary_rows=[
                 ("best epoch", f"{best_row['epoch']} of {config.epochs} ({config.select} "
                                f"{best_row[config.select]:.4f})"),
                 ("training curves", str(ctx.outputs / "training_validation_metrics.png")),
                 *([("near copies", f"{len(leaked)} across splits or classes, listed in "
                                    f"{ctx.outputs / 'near_copies.txt'}")] if leaked else [])])


if __name__ == "__main__":
    main()
