"""The files a run keeps, each one format with a version and one loader that validates it:
best.pth (the selected model), last.pth (everything --resume needs) and gallery.pt (the gallery,
threshold and calibration single-image predictions use). They are data, not code: saved
atomically, loaded with weights_only=True. What a file from an older version needs is handled
here, in its loader, and nowhere else.
"""
import hashlib
import math
from pathlib import Path

import torch

from calibration import calibration_problem
from config import MODEL_KEYS, RULES, SAVED_SETTINGS, from_dict
import files
from files import WeightsError, check_finite_weights, save_atomic
from losses import LOSSES, build_model

FORMAT = 2  # 1: before the files carried a version (a best.pth may name its score "classify")
RESUME_KEYS = ("model", "optimizer", "scaler", "config", "epoch", "step", "partial", "best", "history", "rng")


def best_path(project):
    return Path(project) / "outputs" / "best.pth"


def last_path(project):
    return Path(project) / "outputs" / "last.pth"


def gallery_path(checkpoint):
    """gallery.pt beside its checkpoint."""
    return Path(checkpoint).with_name("gallery.pt")



def save_versioned(contents, path):
    save_atomic({**contents, "format": FORMAT}, path)


def newer_format(state):
    """Why a loaded file cannot be read by this version (written by a newer one), or None."""
    if isinstance(state, dict) and isinstance(state.get("format"), int) and state["format"] > FORMAT:
        return f"written by a newer version of this repository (format {state['format']}); update the repository"
    return None


def load_state(path, what="checkpoint"):
    """files.load_state, refusing a file written by a newer version of this repository."""
    state = files.load_state(path, what)
    if problem := newer_format(state):
        raise WeightsError(f"{what} {path}: {problem} to read it")
    return state




def checked_config(values, path, required=MODEL_KEYS):
    """A saved config as a RunConfig, else one WeightsError naming the file."""
    try:
        return from_dict(values, f"checkpoint {path}", required)
    except ValueError as error:
        raise WeightsError(str(error)) from None


def load_checkpoint(path):
    """(model in eval mode, its RunConfig, the whole checkpoint dict) from best.pth or last.pth."""
    path = Path(path)
    if path.name == "best.pth" and not path.exists() and path.with_name("last.pth").is_file():
        raise WeightsError(f"checkpoint {path}: no such file, but {path.with_name('last.pth')} is there (the run "
                           f"stopped before its first validation): evaluate it with predict.py --checkpoint "
                           f"{path.with_name('last.pth')}, or continue the run with train.py --resume")
    checkpoint = load_state(path)
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "config" not in checkpoint:
        raise WeightsError(f"checkpoint {path}: not a checkpoint of this repo (no model and config); "
                           f"pass PROJECT/outputs/best.pth written by train.py")
    values = checkpoint["config"]
    if not (isinstance(values, dict) and values.get("loss") in LOSSES):  # e.g. another repo's checkpoint
        raise WeightsError(f"checkpoint {path}: its config is not one train.py writes (no known loss); "
                           f"pass PROJECT/outputs/best.pth written by train.py")
    if checkpoint.get("format", 1) == 1 and "classify" in values:  # format 1 named the score "classify"
        values = {**{key: value for key, value in values.items() if key != "classify"}, "score": values["classify"]}
    config = checked_config(values, path)
    model = build_model(config, weights="none")
    # a last.pth of an --ema run holds the model and the average: the average is what its best.pth keeps
    weights = checkpoint["ema"] if isinstance(checkpoint.get("ema"), dict) else checkpoint["model"]
    try:
        model.load_state_dict(weights)
    except (RuntimeError, TypeError, AttributeError):
        raise WeightsError(f"checkpoint {path}: its weights do not fit the {config.loss} "
                           f"model its config describes; the file was edited or mixed up") from None
    check_finite_weights(weights, path)
    return model.eval(), config, checkpoint


def load_last(path):
    """(last.pth's state, its RunConfig), checked (keys, config, counts, finite weights), else one
    line naming it. A last.pth of format 1 is refused: its optimizer state predates the backbone's
    learning-rate scale."""
    state = load_state(path, "--resume")
    missing = [key for key in RESUME_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise WeightsError(f"--resume {path}: not a last.pth written by train.py (no {', '.join(missing)}); "
                           f"start over with --force")
    if state.get("format", 1) < FORMAT:
        raise WeightsError(f"--resume {path}: written by an older train.py, whose optimizer state this one cannot "
                           f"continue; start over with --force (best.pth still evaluates)")
    config = checked_config(state["config"], path, required=SAVED_SETTINGS)
    for key in ("epoch", "step"):
        if not (isinstance(state[key], int) and state[key] >= 0):
            raise WeightsError(f"--resume {path}: {key} = {state[key]!r} is not a count; the file was edited or "
                               f"damaged, start over with --force")
    check_finite_weights(state["model"], path)
    if config.ema:
        if not isinstance(state.get("ema"), dict):
            raise WeightsError(f"--resume {path}: its run keeps a weight average (--ema {config.ema}) but the file "
                               f"holds none; the file was edited or damaged, start over with --force")
        check_finite_weights(state["ema"], path)
    return state, config


def rng_state():
    """Plain values and tensors only, so last.pth loads with weights_only=True. numpy's global
    generator is not saved: nothing here draws from it (samplers own seeded generators)."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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


def describe_checkpoint(path, checkpoint):
    """"best.pth (epoch 3)", or for last.pth the state it holds: "last.pth (0 complete epochs and
    12 steps of epoch 1)"."""
    epoch, step = checkpoint.get("epoch"), checkpoint.get("step") or 0
    if Path(path).name != "last.pth" or not isinstance(epoch, int):
        return f"{path} (epoch {epoch})"
    return f"{path} ({epoch} complete epoch(s)" + (f" and {step} steps of epoch {epoch + 1})" if step else ")")


# ---------------------------------------------------------------------------------------------
# gallery.pt: tied to its checkpoint by the checkpoint's sha256


def checkpoint_stamp(path):
    """sha256 of the checkpoint's bytes: ties a gallery to its checkpoint through copies (cp -r,
    rsync) that change file times."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_gallery(gallery, checkpoint):
    """gallery.pt next to the checkpoint, stamped with its sha256."""
    gallery = {key: value.cpu() if torch.is_tensor(value) else value for key, value in gallery.items()}
    save_versioned({**gallery, "checkpoint_stamp": checkpoint_stamp(checkpoint)}, gallery_path(checkpoint))


def table_problem(name, features, labels, width):
    """What makes stored features and their labels unusable with a model whose features are
    `width` wide, or None; `name` says whose they are in the message ("" or "validation ")."""
    if not (torch.is_tensor(features) and features.is_floating_point() and features.ndim == 2):
        return f"its {name}features are not a table of numbers"
    if features.shape[1] != width:
        return f"its {name}features are {features.shape[1]} wide, the checkpoint's are {width}"
    if not torch.isfinite(features).all():
        return f"its {name}features are not finite (NaN or inf)"
    if not (torch.is_tensor(labels) and labels.shape == (len(features),) and set(labels.tolist()) == {0, 1}):
        return f"its {name}labels are not one 0 or 1 per {name or 'feature '}row, with both classes"
    return None


def setting_problem(gallery, keys):
    """The first of the gallery's `keys` (settings of the run) that breaks its rule (config.py), or None."""
    for key in keys:
        if not RULES[key].test(gallery.get(key)):
            return f"its {key} {gallery.get(key)!r} is not {RULES[key].what}"
    return None


def gallery_problem(gallery, width):
    """What makes a loaded gallery unusable with a model whose features are `width` wide, or None.
    A gallery.pt written before galleries kept their validation features and probability map
    is refused here (the caller rebuilds it from the data, or says how)."""
    features, threshold = gallery.get("features"), gallery.get("threshold")
    problem = table_problem("", features, gallery.get("labels"), width)
    if problem:
        return problem
    if not (isinstance(threshold, (int, float)) and not isinstance(threshold, bool) and math.isfinite(threshold)):
        return f"its threshold {threshold!r} is not a number"
    missing = [key for key in ("validation_features", "validation_labels", "gallery_size", "tta", "calibration",
                               "target_sensitivity") if key not in gallery]
    if missing:
        return f"it was written by an older version, without its {', '.join(missing)}"
    problem = setting_problem(gallery, ("score", "k", "gallery_size", "tta")) or calibration_problem(
        gallery["calibration"])
    if problem:
        return problem
    paths = gallery.get("paths")
    if paths is not None and not (isinstance(paths, list) and len(paths) == len(features)
                                  and all(isinstance(path, str) for path in paths)):
        return "its paths are not one file name per feature row"
    val_labels = gallery["validation_labels"]
    problem = table_problem("validation ", gallery["validation_features"], val_labels, width)
    if problem:
        return problem
    if val_labels.dtype != torch.int64:
        return f"its validation labels are {val_labels.dtype}, not integers"
    return None


def load_gallery(checkpoint, width):
    """(checkpoint's gallery.pt, None), or (None, why there is none to use: missing, unreadable,
    made for another checkpoint, or what gallery_problem finds); the caller says so in one line."""
    path = gallery_path(checkpoint)
    if not path.exists():
        return None, "missing"
    try:
        gallery = files.load_state(path, "gallery")
    except WeightsError:
        return None, "unreadable (truncated, corrupt or not written by this repository)"
    if not isinstance(gallery, dict):
        return None, "not a gallery file"
    if problem := newer_format(gallery):
        return None, problem
    if gallery.get("checkpoint_stamp") != checkpoint_stamp(checkpoint):
        return None, "made for another checkpoint"
    problem = gallery_problem(gallery, width)
    return (None, problem) if problem else (gallery, None)
