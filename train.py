"""Train the Siamese network on the ISIC 2020 split folders, then evaluate it on the test split.

    python train.py --project runs/exp1 --data DATA
    torchrun --nproc_per_node=4 train.py --project runs/exp1 --data DATA      # several GPUs (DDP)

Defaults are the study's: ResNet18 from ImageNet weights, batch 128, Adam lr 1e-5 and weight
decay 1e-5, BCE on the similarity of the design's pairs, 20 epochs; --recipe and --config set
others (config.py). Writes PROJECT/outputs/ (config.yaml, best.pth, last.pth, history.csv,
training_validation_metrics.png) and, through predict.py, PROJECT/results/.
"""
import argparse
import math
import shlex
import shutil
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from timm.utils import ModelEmaV3

from checkpoints import (best_path, check_same_data, data_fingerprint, last_path, load_last, rng_state,
                         save_versioned, set_rng_state)
from cli import Interrupted, interrupt_handler, one_line_errors, progress, stop_after_step
from config import (SETTINGS, RunConfig, check_flags, check_settings, make_parser, parse_with_recipe,
                    write_config)
from dataset import (BalancedBatches, ImageDataset, PairDataset, ShuffledBatches, batch_pairs, collate_images,
                     has_split, load_split, load_train_split, sample_seed, train_transform, write_excluded)
from devices import autocast, to_device
from distributed import run_context, setup_distributed
from files import (WeightsError, first_missing_folder, folder_problem, lock_folder, overlaps,
                   remove_stale_temporaries, write_text_atomic)
from history import EpochTotals, collapse_warning, selected_epoch, selection_key, write_history
from images import attach_cache
from losses import LOSSES, Batch, build_model
from metrics import auc_or_nan
from near_duplicates import leaks
from plots import plot_history
from predict import EvaluationSettings, evaluate
from scheduler import parameter_groups, probing, set_learning_rates
from scoring import Embedding, applicable_scores, embed_and_score, embed_gallery, embedder, resolve_score

VALIDATION_GALLERY_CAP = 256  # gallery images per class when validating each epoch (0 = all would cost an epoch's time)
OUTPUT_FILES = ("best.pth", "last.pth", "config.yaml", "history.csv", "training_validation_metrics.png",
                "gallery.pt", "excluded_images.txt", "near_copies.txt", "near_copies_left_out.txt")
SETTING_FLAGS = tuple(name for name, setting in SETTINGS.items() if setting.metadata["flag"])
COMMAND_FLAGS = ("project", "data", "recipe", "config", "score", "target_sensitivity", "save_every", "device",
                 "workers", "cache", "no_amp", "force")


def parse_args(argv=None):
    """The flags (config.py declares them); a recipe and --config are the defaults under them."""
    parser = make_parser("train.py", __doc__, (*COMMAND_FLAGS[:4], *SETTING_FLAGS, *COMMAND_FLAGS[4:]),
                         required=("project", "data"),
                         helps={"workers": "DataLoader worker processes (default: from the CPU count, at most 8)",
                                "force": "start over in a project that already holds outputs (deletes them)",
                                "score": "how an image's P(malignant) is computed (see predict.py --help; default "
                                         "auto: the loss's own); every other score the model supports is "
                                         "reported beside it"})
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the model (CUDA; slower start, faster steps)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from PROJECT/outputs/last.pth with its saved settings")
    parser.add_argument("--accept-changed-data", action="store_true",
                        help="with --resume: continue although --data's images changed since the run began "
                             "(refused otherwise)")
    return parse_with_recipe(parser, argv)


def check_args(args):
    """Bad flags end here, before any work, with one line each: the paths, the flags the config
    does not keep, the combinations of flags, every setting by its rule (config.py), then --probe-epochs."""
    if not Path(args.data).is_dir():
        raise ValueError(f"--data {args.data}: no such folder; make it with to_subdirectories.py "
                         f"or `python synthetic.py --out {args.data}`")
    for folder in args.extra_train:
        if not Path(folder).is_dir():
            raise ValueError(f"--extra-train {folder}: no such folder; make it with to_subdirectories.py")
    problem = folder_problem(args.project)
    if problem:
        raise ValueError(f"--project {args.project}: {problem}; choose another --project")
    if overlaps(args.project, args.data):  # its results/ would move inside (or with) the data
        raise ValueError(f"--project {args.project}: overlaps --data {args.data}; choose a project folder "
                         f"outside the data")
    check_flags(args, COMMAND_FLAGS)
    if len(args.benign_limit) not in (1, 3) or min(args.benign_limit) < 0:
        raise ValueError("--benign-limit takes one value or three (train validation test), each 0 or more")
    if args.resume and args.force:
        raise ValueError("--resume and --force contradict each other; pick one")
    config = make_config(args)  # raises for a --score the loss cannot give
    if config.aux_weight > 0 and (not LOSSES[config.loss].network.pair_head or config.pairing != "embed-once"):
        raise ValueError("--aux-weight trains a classifier on the Siamese features: it needs --loss bce "
                         "with --pairing embed-once")
    check_settings(config)
    if config.probe_epochs >= config.epochs:
        raise ValueError(f"--probe-epochs {config.probe_epochs}: must be below --epochs {config.epochs}, or the "
                         f"backbone never trains (for that, pass --backbone-lr-scale 0)")


def make_config(args):
    """The RunConfig the flags describe: each setting from the flag of its name (a flag left out
    takes its recipe's or the study's value), except those that follow from the loss."""
    loss = LOSSES[args.loss]
    pair_head = loss.network.pair_head
    aux_weight = args.aux_weight if pair_head or "aux_weight" in args.given else 0.0  # a recipe's is bce's
    derived = {
        "pairing": args.pairing if pair_head else None,
        "benign_limit": list(args.benign_limit * 3 if len(args.benign_limit) == 1 else args.benign_limit),
        "margin": loss.margin if args.margin is None else args.margin,
        "miner": args.miner or loss.miner,
        "per_class": max(2, args.batch_size // 2) if args.per_class is None else args.per_class,
        "aux_weight": aux_weight,
        "score": resolve_score(RunConfig(loss=args.loss, aux_weight=aux_weight), args.score[0]),
        "sampler": loss.sampler or args.sampler,
        "data": str(Path(args.data).resolve()),
        "recipe": args.recipe,
        "extra_train": [str(Path(folder).resolve()) for folder in args.extra_train],
    }
    return RunConfig(**{name: derived[name] if name in derived else getattr(args, name) for name in SETTINGS})


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
    if "epochs" in args.given and args.epochs != config.epochs:
        if args.epochs < epochs_done:
            raise ValueError(f"--epochs {args.epochs}: the resumed run has finished {epochs_done} epochs already")
        say(f"--epochs {args.epochs}: applied (the run was set to {config.epochs})")
        config.epochs = args.epochs


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


def on_device(batch, config, device, generator):
    """A loader's batch as losses.Batch on the device: the design's pairs drawn inside it, or, with
    --pairing two-pass, the study's pairs (first images, second images, targets)."""
    if config.pairing == "two-pass":
        first, second, targets = batch
        return Batch(to_device(first, device), None, None, None, targets.to(device).float(),
                     to_device(second, device))
    images, labels, is_anchor = batch
    anchors, partners, targets = (t.to(device) for t in batch_pairs(labels, is_anchor, generator))
    return Batch(to_device(images, device), labels.to(device), anchors, partners, targets)


@torch.no_grad()
def validate(model, train, validation, config, ctx, amp):
    """Validation pair loss and accuracy (the design's fixed pairs) and image-level AUC, from
    scoring.embed_and_score: the same code that evaluates the test split."""
    embed = embedder(model, Embedding(config.image_size, config.val_batch_size, ctx.device, ctx.workers, amp,
                                      ctx.rank, ctx.world_size))
    gallery = embed_gallery(train, min(config.gallery_size or VALIDATION_GALLERY_CAP, VALIDATION_GALLERY_CAP),
                            config.seed, embed)
    scored = embed_and_score(model, {"validation": validation}, gallery, embed, config.score, config.k, config.seed)
    scored = scored["validation"]
    spread = (scored.features - scored.features.mean(0)).norm(dim=1).mean().item()
    return {"val_loss": scored.pair_summary["pair_loss"], "val_acc": scored.pair_summary["pair_accuracy"],
            "val_auc": auc_or_nan(validation.labels, scored.scores), "embedding_spread": spread}


def check_outputs(outputs, args):
    """Refuse to overwrite an earlier run's outputs unless --resume or --force says what to do.
    Returns the files --force will delete (once the data have been checked)."""
    found = [name for name in OUTPUT_FILES if (outputs / name).exists()]
    if args.resume and not last_path(args.project).exists():
        raise ValueError(f"--resume: {last_path(args.project)} does not exist; start without --resume")
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
class Training:
    """What the epochs step: the model (raw_model unwrapped, model as called: DDP or compiled),
    its optimizer and gradient scaler, the batches and the loss (losses.py)."""
    raw_model: torch.nn.Module
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    sampler: ShuffledBatches | BalancedBatches
    loader: DataLoader
    loss: object  # called with (model, Batch)
    steps_per_epoch: int
    amp: bool  # mixed precision on CUDA (--no-amp turns it off)
    data: dict  # the images it trains and validates on (data_fingerprint), saved in last.pth
    ema: ModelEmaV3 | None  # --ema: the average of raw_model's weights, or None


def main(argv=None):
    args = parse_args(argv)
    stop = {"signal": None}
    previous = {s: signal.signal(s, stop_after_step(stop)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with one_line_errors("train.py", lambda: write_advice(args), interrupts=False):
            check_args(args)
            ctx = run_context(args, *setup_distributed(args.device))
            run_in_project(args, ctx, stop)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if dist.is_initialized():
            dist.destroy_process_group()


def write_advice(args):
    last = last_path(args.project)
    return ("free disk space or fix permissions (or choose another path), then " +
            (f"rerun with --resume: {last} holds the last complete state" if last.is_file() else
             "no checkpoint was saved, so rerun as before"))


def run_in_project(args, ctx, stop):
    """run() holding the project's lock, its endings said in one line: how to resume a stopped
    run, how to evaluate again, and no empty project left behind by unusable weights."""
    created = first_missing_folder(ctx.outputs)
    lock, new_lock = None, not (Path(args.project) / ".lock").exists()
    try:
        check_outputs(ctx.outputs, args)  # before the lock: a refused run creates nothing
        lock = lock_project(args.project, ctx)
        run(args, ctx, stop)
    except StopForResume as stopped:
        ctx.say(stopped)
        sys.exit(128 + stopped.signum)
    except Interrupted as stopped:  # during the final evaluation, on rank 0
        stopped.note = (f"{getattr(stopped, 'note', None) or 'nothing was written'}. Training is complete; evaluate "
                        f"again with: python predict.py --project {shlex.quote(str(args.project))} --data "
                        f"{shlex.quote(str(args.data))}")
        print(f"train.py: stopped by {signal.Signals(stopped.signum).name} during the evaluation; {stopped.note}",
              file=sys.stderr)
        sys.exit(128 + stopped.signum)
    except WeightsError:  # e.g. no network for --weights imagenet: leave no empty project behind
        if ctx.rank == 0 and created is not None and not any(created.rglob("*.pth")):
            shutil.rmtree(created, ignore_errors=True)
        if ctx.rank == 0 and new_lock and lock is not None:  # in a folder that existed, the lock file is ours
            (Path(args.project) / ".lock").unlink(missing_ok=True)
        raise
    except (MemoryError, RuntimeError) as error:  # CUDA's OutOfMemoryError; the CPU's "can't allocate memory"
        if not isinstance(error, (MemoryError, torch.cuda.OutOfMemoryError)) and "allocate" not in str(error):
            raise
        reason = (str(error).splitlines() or [type(error).__name__])[0][:100]
        if args.resume:  # its sizes are last.pth's, and --resume keeps them
            raise ValueError(f"out of memory resuming {args.project} ({reason}); its --image-size and --batch-size "
                             f"need more memory than this machine has: start a new run with lower ones") from None
        raise ValueError(f"out of memory at --image-size {args.image_size} and --batch-size {args.batch_size} "
                         f"({reason}); lower --batch-size or --image-size") from None
    finally:
        if lock is not None:
            lock.close()  # releases the project


def lock_project(project, ctx):
    """One run owns a project at a time: rank 0 locks PROJECT/.lock for the whole run
    (files.lock_folder), and a second run on it stops at once, naming the first one's pid."""
    lock, holder = lock_folder(project) if ctx.rank == 0 else (None, None)
    if ctx.sum([holder is not None])[0]:
        raise ValueError(f"{Path(project) / '.lock'}: another train.py run (pid {holder or 'on rank 0'}) is using "
                         f"--project {project}; wait for it to end, or choose another --project")
    return lock


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
    leaked = prepare_outputs(to_delete, config, splits, ctx)
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


def resume_message(args, outputs, epochs_done, steps_done):
    return (f"stopped after {epochs_done} complete epoch(s) and {steps_done} step(s) of the next; "
            f"{outputs / 'last.pth'} holds that state. Continue with:\n"
            f"  python train.py --project {shlex.quote(str(args.project))} --data {shlex.quote(str(args.data))} "
            f"--resume")


def run_config(args, ctx):
    """(config, last.pth's state or None): a new run's config from the flags, or the resumed run's."""
    if not args.resume:
        return make_config(args), None
    resume, config = load_last(last_path(args.project))
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


def prepare_outputs(to_delete, config, splits, ctx):
    """--force deletes the earlier run now that the data are known to be usable; then config.yaml,
    the list of excluded images, the counts, and the near copies across splits or classes (returned)."""
    if ctx.rank == 0:
        for name in to_delete:
            (ctx.outputs / name).unlink()
        ctx.outputs.mkdir(parents=True, exist_ok=True)
        write_config(config, ctx.outputs)
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


def build_training(args, config, raw_model, splits, resume, ctx):
    """(Training, RunState): the model's optimizer, scaler and batches, fresh or from last.pth."""
    device, world_size = ctx.device, ctx.world_size
    if device.type == "cuda":
        raw_model = raw_model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick its fastest kernels
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    optimizer_class = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    groups = parameter_groups(raw_model, config.backbone_lr_scale, probe=config.probe_epochs > 0)
    optimizer = optimizer_class(groups, lr=config.lr, weight_decay=config.weight_decay)
    use_scaler = device.type == "cuda" and not args.no_amp and not torch.cuda.is_bf16_supported()
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    state = RunState()
    # the decay at the n-th update is 1 - n ** -0.75 (0 at the first), at most --ema: the random head fades
    ema = ModelEmaV3(raw_model, decay=config.ema, use_warmup=True, warmup_power=3 / 4) if config.ema else None
    if resume:
        restore(resume, raw_model, optimizer, scaler if use_scaler else None, ema, config, ctx.outputs)
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
    loss = LOSSES[config.loss](config, pos_weight, world_size)
    return Training(raw_model, model, optimizer, scaler, sampler, loader, loss, len(sampler.batches()),
                    not args.no_amp, data_fingerprint(splits), ema), state


def restore(resume, raw_model, optimizer, scaler, ema, config, outputs):
    """last.pth's weights, optimizer (and scaler) state, weight average and random streams."""
    try:
        raw_model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        if ema:
            ema.module.load_state_dict(resume["ema"])
    except (RuntimeError, ValueError, KeyError, TypeError):
        raise WeightsError(f"--resume {last_path(outputs.parent)}: its weights, optimizer state or average do not fit "
                           f"the {config.loss} model of its config; start over with --force") from None
    if resume["scaler"] and scaler is not None:
        scaler.load_state_dict(resume["scaler"])
    set_rng_state(resume["rng"])


def save_last(training, config, state, ctx):
    """last.pth: everything --resume needs to continue exactly where the run is (rank 0 writes)."""
    if ctx.rank == 0:
        save_versioned({"model": training.raw_model.state_dict(), "optimizer": training.optimizer.state_dict(),
                        "scaler": training.scaler.state_dict(), "config": config.as_dict(), "epoch": state.epoch,
                        "step": state.step, "partial": state.partial, "best": state.best,
                        "history": state.history, "rng": rng_state(), "data": training.data,
                        "ema": training.ema.module.state_dict() if training.ema else None},
                       last_path(ctx.outputs.parent))


def train_one_epoch(training, config, epoch, state, stop, ctx):
    """One epoch (or the rest of a resumed one). Returns (its EpochTotals over all ranks, the step
    a signal stopped it at or None)."""
    steps_per_epoch, total_steps = training.steps_per_epoch, config.epochs * training.steps_per_epoch
    first_step = state.step if epoch == state.epoch else 0
    # a resumed epoch's saved totals are already sums over ranks: rank 0 alone starts from them
    resumed = epoch == state.epoch and state.partial and ctx.rank == 0
    totals = EpochTotals(*state.partial) if resumed else EpochTotals()
    training.sampler.set_epoch(epoch, first_step)
    training.model.train()
    if config.backbone_lr_scale == 0 or probing(epoch * steps_per_epoch, total_steps, config):  # BatchNorm as loaded
        training.raw_model.backbone.eval()
    bar = progress(training.loader, f"epoch {epoch + 1}/{config.epochs}", disable=ctx.rank != 0,
                   initial=first_step, total=first_step + len(training.sampler), leave=False)
    for step, batch in enumerate(bar, start=first_step + 1):
        done = epoch * steps_per_epoch + step  # the run's optimizer steps, this one included
        set_learning_rates(training.optimizer, done - 1, total_steps, config)
        generator = torch.Generator().manual_seed(sample_seed(config.seed + 1, epoch, step))
        with autocast(ctx.device, training.amp):
            result = training.loss(training.model, on_device(batch, config, ctx.device, generator))
        loss_value = result.loss.item() / training.loss.world_size_scale
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
        if training.ema:
            training.ema.update(training.raw_model, step=done)
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
    metric = LOSSES[config.loss].reports_active
    row = {"epoch": epoch + 1, "train_loss": totals.loss / totals.count, "train_acc": totals.correct / totals.count,
           "active_fraction": totals.active / totals.steps if metric else math.nan,
           "lr": training.optimizer.param_groups[-1]["lr"]}  # the head's (the backbone's may be scaled)
    validated = training.ema.module if training.ema else training.raw_model  # what best.pth keeps
    if ctx.world_size > 1:  # every rank validates rank 0's BatchNorm statistics, the model best.pth holds
        for buffer in validated.buffers():
            dist.broadcast(buffer, 0)
    try:
        row.update(validate(validated, splits["train"], splits["validation"], config, ctx, training.amp))
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
    best = best_path(ctx.outputs.parent)
    if state.best is None or key > state.best:
        state.best = key
        if ctx.rank == 0:
            save_versioned({"model": validated.state_dict(), "config": config.as_dict(),
                            "epoch": epoch + 1, "select": config.select, "select_value": row[config.select]}, best)
        ctx.say(f"  best {config.select} so far ({row[config.select]:.4f}): saved {best}")
    state.epoch, state.step, state.partial = epoch + 1, 0, None
    save_last(training, config, state, ctx)  # first: a history.csv listing epoch k means last.pth holds it
    if ctx.rank == 0:
        write_history(state.history, ctx.outputs / "history.csv")
        plot_history(state.history, ctx.outputs / "training_validation_metrics.png",
                     selected_epoch(state.history, config.select))


def evaluate_best(args, config, splits, history, ctx, amp, started, leaked=()):
    """predict.evaluate of best.pth on the test split (or validation) into PROJECT/results, with
    every score the model supports (the run's own first)."""
    evaluated = splits.get("test", splits["validation"])
    print(f"\nevaluating {best_path(args.project)} on the {evaluated.name} split")
    best_row = next(row for row in history if row["epoch"] == selected_epoch(history, config.select))
    settings = EvaluationSettings(config.gallery_size, [config.score, *applicable_scores(config)], config.k,
                                  args.target_sensitivity, save_every=args.save_every,
                                  batch_size=config.val_batch_size, device=ctx.device, workers=ctx.workers, amp=amp)
    rows = [("best epoch", f"{best_row['epoch']} of {config.epochs} ({config.select} {best_row[config.select]:.4f})"),
            ("training curves", str(ctx.outputs / "training_validation_metrics.png"))]
    if leaked:
        rows.append(("near copies", f"{len(leaked)} across splits or classes, listed in "
                                    f"{ctx.outputs / 'near_copies.txt'}"))
    evaluate(best_path(args.project), config.data, Path(args.project) / "results", settings,
             {"train": splits["train"], "validation": splits["validation"], "evaluated": evaluated}, started, rows)


if __name__ == "__main__":
    main()
