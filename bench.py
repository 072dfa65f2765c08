"""Throughput of training and evaluation on this machine, every figure measured side by side in
one run. Prints a table and, as its last line, one JSON object with the figures and the ratios.

    python bench.py --quick                       # CPU, 128 px, synthetic JPEGs, under 2 minutes
    python bench.py --device cuda --image-size 224 --batch-size 256

Modes (the training step is train.py's own, embed-once BCE unless said otherwise):
    model         training images/s on random tensors already in memory (the ceiling)
    e2e           training images/s from JPEG files through the DataLoader (decode + augment)
    cached_e2e    the same from the uint8 cache (--cache)
    two_pass      training pairs/s of the study's two-pass pairing (random tensors)
    embed_once    training pairs/s of embed-once pairing (random tensors)
    eval_pairs    test pairs/s: per-pair loop (batch of one pair, two backbone passes, the study)
                  vs embed every image once and score the pairs from stored embeddings
    gallery       test images/s scored against the gallery: each image with each gallery image by two
                  backbone passes vs from stored embeddings
    external      another clinic's images/s evaluated (predict.build_gallery; the test split stands in):
                  the gallery and validation embedded again from the training data vs from the stored
                  gallery (gallery.pt), which embeds only the clinic's images
    bootstrap     AUC intervals/s of one score on 600 images (as many as ISIC 2017's test split): one
                  roc_auc_score call per resample vs metrics.bootstrap_auc, every resample at once
"""
import dataclasses
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from cli import one_line_errors
from config import make_parser
from dataset import eval_transform, load_split
from devices import autocast, pick_device, to_device
from distributed import RunContext, default_workers
from gallery import Scoring, build_gallery
from images import attach_cache
from losses import LOSSES, build_model
from metrics import bootstrap_auc
from modules import SiameseNetwork
from scoring import Embedding, embed_images, embedder, similarity_matrix
from synthetic import make_synthetic
from train import make_config, make_train_loader, on_device, parse_args as train_args


def peak_rss_mb():
    """Peak resident memory of this process since the last reset_peak_rss(), in MiB."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak(device):
    try:
        with open("/proc/self/clear_refs", "w") as file:
            file.write("5")  # Linux: reset the peak-RSS counter
    except OSError:
        pass
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peaks(device):
    out = {"peak_rss_mb": round(peak_rss_mb(), 1)}
    if device.type == "cuda":
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)
    return out


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device, run, warmup, steps):
    """Seconds per call of run(), after warmup calls."""
    for _ in range(warmup):
        run()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        run()
    sync(device)
    return (time.perf_counter() - start) / steps


def train_step(model, optimizer, batch, config, device, amp):
    generator = torch.Generator().manual_seed(0)
    with autocast(device, amp):
        loss, *_ = LOSSES[config.loss](config)(model, on_device(batch, config, device, generator))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def random_batch(batch_size, size, seed=0):
    """A single-image batch with both classes, as the embed-once loader yields it."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(batch_size) % 2
    return torch.randn(batch_size, 3, size, size, generator=g), labels, torch.ones(batch_size, dtype=torch.bool)


def measure_training(args, device, data):
    config = make_config(train_args(["--project", "-", "--data", str(data), "--weights", "none",
                                     "--backbone", args.backbone, "--image-size", str(args.image_size),
                                     "--batch-size", str(args.batch_size)]))
    model = build_model(config).to(device).train()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)
    amp, results = not args.no_amp, {}

    # model only: random tensors already in memory
    reset_peak(device)
    batch = random_batch(args.batch_size, args.image_size)
    seconds = timed(device, lambda: train_step(model, optimizer, batch, config, device, amp), args.warmup, args.steps)
    results["model"] = {"images_per_s": args.batch_size / seconds, "pairs_per_s": args.batch_size / seconds, **peaks(device)}

    # end to end from JPEG files, then from the uint8 cache
    for mode in ("e2e", "cached_e2e"):
        reset_peak(device)
        train = load_split(data, "train", 0, 0, args.workers or 1)
        if mode == "cached_e2e":
            attach_cache(train, Path(args.tmp) / "cache", args.image_size, args.workers)
        sampler, loader = make_train_loader(train, config, RunContext(0, 1, device, Path(args.tmp), args.workers))
        batches, n_images = iter_forever(sampler, loader), []

        def step():
            batch = next(batches)
            n_images.append(int(batch[2].sum()))  # anchors; top-up partners are not counted
            train_step(model, optimizer, batch, config, device, amp)
        seconds = timed(device, step, args.warmup, args.steps)
        results[mode] = {"images_per_s": sum(n_images[args.warmup:]) / args.steps / seconds, **peaks(device)}
        del loader

    # pairs per second: the study's two passes per pair vs one pass per image
    reset_peak(device)
    first, second = random_batch(args.batch_size, args.image_size, 1)[0], random_batch(args.batch_size, args.image_size, 2)[0]
    targets = (torch.arange(args.batch_size) % 2).float()
    two_pass = dataclasses.replace(config, pairing="two-pass")
    seconds = timed(device, lambda: train_step(model, optimizer, (first, second, targets), two_pass, device, amp),
                    args.warmup, args.steps)
    results["two_pass"] = {"pairs_per_s": args.batch_size / seconds, **peaks(device)}
    results["embed_once"] = {"pairs_per_s": results["model"]["pairs_per_s"]}
    return results


def iter_forever(sampler, loader):
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


@torch.no_grad()
def measure_evaluation(args, device, data):
    model = SiameseNetwork("none", backbone=args.backbone).to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    amp, size, results = not args.no_amp, args.image_size, {}
    how = Embedding(size, args.batch_size, device, 0, amp)  # predict.py's 0 workers: each image is decoded once
    test = load_split(data, "test", 0, 0)
    train = load_split(data, "train", 0, 0)
    n, gallery_indices = len(test), torch.arange(min(len(train), 2 * args.gallery_size))

    # test pairs: the study's loop, one pair per batch and two backbone passes
    def per_pair_loop(count):
        for i in range(count):
            x1 = to_device(test_batch(test, [i], size), device)
            x2 = to_device(test_batch(test, [(i + 1) % n], size), device)
            with autocast(device, amp):
                model.pair_similarity(model.embed(x1), model.embed(x2)).item()
    loop_count = min(n, args.loop_pairs)
    reset_peak(device)
    loop_seconds = timed(device, lambda: per_pair_loop(loop_count), 1, 1) / loop_count

    def stored_pairs():
        features = embed_images(model, test, how)
        model.pair_similarity(features, features.roll(1, 0)).sum().item()
    stored_seconds = timed(device, stored_pairs, 1, 1) / n
    results["eval_pairs"] = {"loop_pairs_per_s": 1 / loop_seconds, "stored_pairs_per_s": 1 / stored_seconds, **peaks(device)}

    # gallery scoring: every test image against every gallery image
    gallery = to_device(test_batch(train, gallery_indices.tolist(), size), device)

    def naive(count):
        for i in range(count):
            image = to_device(test_batch(test, [i], size), device).expand(len(gallery), -1, -1, -1)
            with autocast(device, amp):
                model.pair_similarity(model.embed(image), model.embed(gallery)).mean().item()
    naive_count = min(n, args.naive_images)
    reset_peak(device)
    naive_seconds = timed(device, lambda: naive(naive_count), 0, 1) / naive_count

    def scored_from_embeddings():
        features = embed_images(model, test, how)
        gallery_features = embed_images(model, train, how, gallery_indices.tolist())
        with autocast(device, amp):
            similarity_matrix(model, features, gallery_features).mean().item()
    stored_seconds = timed(device, scored_from_embeddings, 1, 1) / n
    results["gallery"] = {"naive_images_per_s": 1 / naive_seconds, "stored_images_per_s": 1 / stored_seconds,
                          "gallery_images": len(gallery), **peaks(device)}
    results["external"] = measure_external(model, train, test, how, args, data)
    return results


def measure_external(model, train, test, how, args, data):
    """Another clinic's folder: its gallery and validation rebuilt from the training data, or read
    from gallery.pt's stored features."""
    device, validation = how.device, load_split(data, "validation", 0, 0)
    embed, scoring, kept = embedder(model, how), Scoring(args.gallery_size, "gallery", 10), {}

    def rebuilt():
        kept["gallery"], _ = build_gallery(model, train, {"validation": validation, "evaluated": test}, embed,
                                           scoring, 0)
    reset_peak(device)
    rebuilt_seconds = timed(device, rebuilt, 0, 1) / len(test)
    stored_seconds = timed(device, lambda: build_gallery(model, None, {"validation": None, "evaluated": test}, embed,
                                                         scoring, 0, stored=kept["gallery"]), 0, 1) / len(test)
    return {"rebuilt_images_per_s": 1 / rebuilt_seconds, "stored_images_per_s": 1 / stored_seconds,
            "validation_images": len(validation), **peaks(device)}


def measure_bootstrap(args):
    """The AUC interval of one score, as predict.py reports it for every score of an evaluation."""
    rng = np.random.default_rng(0)
    labels = (np.arange(600) < 240).astype(int)
    scores = rng.random(600) + 0.3 * labels

    def one_call_per_resample():
        aucs = []
        for _ in range(args.resamples):
            sample = rng.integers(0, len(labels), len(labels))
            aucs.append(roc_auc_score(labels[sample], scores[sample]))
        np.percentile(aucs, [2.5, 97.5])
    cpu = torch.device("cpu")
    loop_seconds = timed(cpu, one_call_per_resample, 0, 1)
    vectorised_seconds = timed(cpu, lambda: bootstrap_auc(labels, scores, args.resamples), 1, 3)
    return {"bootstrap": {"loop_intervals_per_s": 1 / loop_seconds,
                          "vectorised_intervals_per_s": 1 / vectorised_seconds, "resamples": args.resamples}}


def test_batch(split, indices, size):
    """Evaluation inputs the plain way: read, transform and stack, one image at a time."""
    transform = eval_transform(size)
    return torch.stack([transform(split.read(i)) for i in indices])


def parse_args(argv=None):
    parser = make_parser("bench.py", __doc__, ("device", "backbone", "image_size", "batch_size", "data", "workers",
                                               "gallery_size", "no_amp"),
                         defaults={"backbone": "resnet18", "image_size": None, "batch_size": None, "workers": None},
                         helps={"backbone": "the network measured",
                                "image_size": "default 128 on the CPU, 224 on a GPU",
                                "batch_size": "default 32 on the CPU, 256 on a GPU",
                                "data": "split folder to read (default: synthetic 256 px JPEGs in a temp folder)",
                                "workers": "DataLoader workers (default: train.py's rule)"})
    parser.add_argument("--steps", type=int, default=None, help="timed training steps per mode (default 8, quick 4)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before each measurement")
    parser.add_argument("--quick", action="store_true", help="fewer steps and images: under 2 minutes on 2 CPU cores")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    with one_line_errors("bench.py"):
        device = pick_device(args.device)
    gpu = device.type == "cuda"
    args.image_size = args.image_size or (224 if gpu else 128)
    args.batch_size = args.batch_size or (256 if gpu else 32)
    args.steps = args.steps or (4 if args.quick else 8)
    args.workers = args.workers if args.workers is not None else default_workers()
    args.loop_pairs = 16 if args.quick else 64
    args.naive_images = 2 if args.quick else 4
    args.resamples = 200 if args.quick else 1000  # predict.py's: 1000
    if gpu:
        torch.backends.cudnn.benchmark = True

    with tempfile.TemporaryDirectory() as tmp:
        args.tmp = tmp
        data = args.data
        if data is None:
            data = Path(tmp) / "data"
            n_train = max(4, (args.warmup + args.steps) * args.batch_size // 2 + args.batch_size)
            n_test = 64 if args.quick else 256
            make_synthetic(data, size=256, seed=0, counts={"train": (n_train, n_train),
                                                           "validation": (n_test // 2, n_test // 2),
                                                           "test": (n_test // 2, n_test // 2)})
        started = time.perf_counter()
        with one_line_errors("bench.py"):
            results = measure_training(args, device, data)
            results.update(measure_evaluation(args, device, data))
            results.update(measure_bootstrap(args))
    print_report(args, device, results, time.perf_counter() - started)


def print_report(args, device, results, seconds):
    """The throughput of every mode, the ratios between them, and the same as one JSON line."""
    gpu = device.type == "cuda"
    ratios = {
        "e2e_over_model": results["e2e"]["images_per_s"] / results["model"]["images_per_s"],
        "cached_e2e_over_model": results["cached_e2e"]["images_per_s"] / results["model"]["images_per_s"],
        "embed_once_over_two_pass": results["embed_once"]["pairs_per_s"] / results["two_pass"]["pairs_per_s"],
        "eval_pairs_speedup": results["eval_pairs"]["stored_pairs_per_s"] / results["eval_pairs"]["loop_pairs_per_s"],
        "gallery_speedup": results["gallery"]["stored_images_per_s"] / results["gallery"]["naive_images_per_s"],
        "external_speedup": results["external"]["stored_images_per_s"] / results["external"]["rebuilt_images_per_s"],
        "bootstrap_speedup": (results["bootstrap"]["vectorised_intervals_per_s"]
                              / results["bootstrap"]["loop_intervals_per_s"]),
    }
    machine = (torch.cuda.get_device_name(device) if gpu else f"{os.cpu_count()} CPU cores") + \
        f", torch {torch.__version__}, {args.backbone}, {args.image_size} px, batch {args.batch_size}, " \
        f"workers {args.workers}" + \
        (", bf16/fp16 autocast" if gpu and not args.no_amp else ", fp32")
    print(f"\n{machine}")
    print(f"{'mode':<12} {'throughput':>24} {'peak RSS MiB':>13}" + (f" {'peak GPU MiB':>13}" if gpu else ""))
    for mode, row in results.items():
        rates = ", ".join(f"{v:,.1f} {k.replace('_per_s', '/s')}" for k, v in row.items() if k.endswith("_per_s"))
        memory = f"{row.get('peak_rss_mb', float('nan')):>13,.0f}" + (f" {row.get('peak_gpu_mb', float('nan')):>13,.0f}" if gpu else "")
        print(f"{mode:<12} {rates:>24} {memory}")
    for name, value in ratios.items():
        print(f"{name:<28} {value:8.2f}")
    print(f"({seconds:.0f} s)")
    print(json.dumps({"machine": machine, **{k: round(v, 3) for k, v in ratios.items()},
                      "modes": {m: {k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()}
                                for m, r in results.items()}}))


if __name__ == "__main__":
    main()
