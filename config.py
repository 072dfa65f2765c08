"""Every setting, written once, and the one builder of every script's command line.

A run's settings are RunConfig's fields: each carries its default (the study's), the rule its value
keeps and its flag's help. The flags the commands share beyond a run's settings are
COMMAND_FLAGS. A script names the flags it takes, and make_parser adds them: a flag is declared
here and nowhere else. Recipes are YAML files in recipes/ holding some settings; as in timm's
_parse_args, a recipe and a user's --config file become the parser's defaults, so a flag typed on
the command line still wins. Every run writes its resolved settings to
PROJECT/outputs/config.yaml, which is itself a valid --config file.
"""
import argparse
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, NamedTuple

import yaml

from cli import ArgumentParser
from dataset import AUGMENTATIONS
from files import write_text_atomic
from losses import LOSSES
from modules import BACKBONES, FEATURES
from scoring import SCORE_METHODS, SCORES

RECIPE_FOLDER = Path(__file__).resolve().with_name("recipes")
CONFIG_FILE = "config.yaml"  # in PROJECT/outputs/


class Rule(NamedTuple):
    """What a setting's value must be: a test and its words for the error message."""
    test: Callable
    what: str


def _whole(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def at_least(low, why=""):
    return Rule(lambda v: _whole(v) and v >= low, f"an integer of at least {low}{why}")


def number(low, high=None, low_open=False):
    """A finite number from low (excluded if low_open) to high."""
    words = f"> {low:g}" if low_open else f">= {low:g}"
    return Rule(lambda v: _finite(v) and (v > low if low_open else v >= low) and (high is None or v <= high),
                f"a finite number {words}" + (f" and <= {high:g}" if high is not None else ""))


def one_of(values, none=False):
    return Rule(lambda v: v in values or (none and v is None),
                f"one of {', '.join(map(str, values))}" + (" or None" if none else ""))


def of_type(kind, what):
    return Rule(lambda v: isinstance(v, kind), what)


@dataclass(frozen=True)
class Flag:
    """One flag: its help, the rule its value keeps (checked when the command line is parsed), and
    what argparse needs beyond that (type, choices, nargs, action, metavar)."""
    help: str
    rule: Rule = None
    default: object = None
    options: dict = field(default_factory=dict)


def setting(default, help, rule, flag=True, **options):
    """A RunConfig field with its default, its rule and (unless flag=False) its flag's help."""
    metadata = {"flag": Flag(help, rule, options=options) if flag else None, "rule": rule}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class RunConfig:
    """A run's settings as train.py's flags resolve them; the defaults are the study's. Saved in every
    checkpoint as a plain dict (as_dict, loadable with weights_only=True) and in config.yaml."""
    loss: str = setting("bce", "bce: the design's Siamese pairs; contrastive / triplet: metric learning on an "
                        "L2-normalised embedding; ce: plain classifier baseline (class-weighted BCE)",
                        one_of(tuple(LOSSES)), choices=tuple(LOSSES))
    pairing: str | None = setting("embed-once", "bce only. embed-once: each batch image passes the backbone once "
                                  "and the design's pairs are drawn inside the batch; two-pass: the study's pair "
                                  "dataset, two passes per pair", one_of(("embed-once", "two-pass"), none=True),
                                  choices=("embed-once", "two-pass"))
    weights: str = setting("imagenet", "backbone start: imagenet (ResNet18: torchvision, downloaded once; "
                           "EfficientNet-Lite0: the pip package, offline), none (random), or a .pth path",
                           of_type(str, "a string"))
    image_size: int = setting(224, "side of the square network input in pixels",
                              at_least(32, " (the backbones downsample 32x)"), type=int)
    epochs: int = setting(20, "training epochs (with --resume, a new total for the run)", at_least(1), type=int)
    batch_size: int = setting(128, "training images per batch on each process",
                              at_least(2, " (BatchNorm needs two or more images per training batch)"), type=int)
    val_batch_size: int = setting(16, "images per validation/test batch", at_least(1), type=int)
    lr: float = setting(1e-5, "peak learning rate", number(0, low_open=True), type=float)
    weight_decay: float = setting(1e-5, "weight decay (L2 for adam, decoupled for adamw)", number(0), type=float)
    benign_limit: list = setting([4000, 1000, 1000], "cap on benign images in train, validation and test (one "
                                 "value: all three); 0 = no cap, the full data set",
                                 Rule(lambda v: isinstance(v, (list, tuple)) and len(v) == 3
                                      and all(_whole(x) and x >= 0 for x in v), "three integers >= 0"),
                                 type=int, nargs="+", metavar="N")
    seed: int = setting(0, "fixes the benign subset, pairs, initialisation and sampling",
                        Rule(lambda v: _whole(v) and 0 <= v < 2 ** 32, "an integer from 0 to 2**32 - 1"), type=int)
    partners_per_class: int = setting(8, "embed-once: a batch with fewer images of a class than this is topped up "
                                      "with random images of that class that serve only as partners",
                                      at_least(2), type=int)
    embed_dim: int = setting(128, "contrastive/triplet embedding size", at_least(1), type=int)
    margin: float | None = setting(None, "contrastive/triplet margin (default: 0.5 contrastive, 0.2 triplet)",
                                   Rule(lambda v: v is None or (_finite(v) and v > 0),
                                        "a finite number > 0 (None: the loss's default)"), type=float)
    miner: str | None = setting(None, "contrastive/triplet miner (default: semihard for triplet, all pairs for "
                                "contrastive)", one_of(("semihard", "hard", "all"), none=True),
                                choices=("semihard", "hard", "all"))
    per_class: int | None = setting(None, "contrastive/triplet: images of each class per batch (default "
                                    "batch-size / 2)", Rule(lambda v: v is None or (_whole(v) and v >= 2),
                                                            "an integer of at least 2"), type=int)
    select: str = setting("val_auc", "what best.pth keeps: the highest validation AUC, or the lowest validation "
                          "pair loss (the study's rule)", one_of(("val_auc", "val_loss")),
                          choices=("val_auc", "val_loss"))
    score: str = setting("gallery", "", one_of(SCORE_METHODS), flag=False)  # --score (COMMAND_FLAGS) resolved
    gallery_size: int = setting(64, "gallery images per class for image-level scores; 0 = every training image. "
                                "Validation during training uses at most 256 per class", at_least(0), type=int)
    k: int = setting(10, "neighbours for --score knn and head-knn", at_least(1), type=int)
    sync_bn: bool = setting(False, "DDP: synchronise BatchNorm statistics across processes",
                            of_type(bool, "True or False"), action="store_true")
    data: str = setting("", "", of_type(str, "a string"), flag=False)  # --data, resolved to an absolute path
    recipe: str = setting("study", "", Rule(lambda v: isinstance(v, str), "a recipe name"), flag=False)
    optimizer: str = setting("adam", "adam: L2 penalty in the gradient, as the study; adamw: decoupled weight "
                             "decay", one_of(("adam", "adamw")), choices=("adam", "adamw"))
    schedule: str = setting("constant", "learning rate over the run after the warm-up: constant or cosine decay "
                            "to 0", one_of(("constant", "cosine")), choices=("constant", "cosine"))
    warmup_epochs: float = setting(0.0, "epochs of linear learning-rate warm-up from 0", number(0), type=float)
    augment: str = setting("study", "study: the study's affine warp, crop and horizontal flip; dermoscopy: adds "
                           "vertical flips, 90-degree rotations and colour jitter", one_of(AUGMENTATIONS),
                           choices=AUGMENTATIONS)
    aux_weight: float = setting(0.0, "bce: weight of an auxiliary malignant-vs-benign loss on the Siamese "
                                "features, trained jointly with the pair BCE (other losses: 0)", number(0),
                                type=float)
    sampler: str = setting("shuffled", "bce/ce training batches: shuffled (every image once per epoch) or "
                           "balanced (half malignant, so malignant images are not starved); contrastive and "
                           "triplet always use balanced batches", one_of(("shuffled", "balanced")),
                           choices=("shuffled", "balanced"))
    tta: bool = setting(False, "evaluate with features averaged over each image's four flips",
                        of_type(bool, "True or False"), action=argparse.BooleanOptionalAction)
    backbone: str = setting("resnet18", "resnet18 (the design, torchvision) or efficientnet_lite0, _lite1 or "
                            "_lite2 (timm; their ImageNet weights install with pip, no download at run time)",
                            one_of(tuple(BACKBONES)), choices=tuple(BACKBONES))
    features: str = setting("imagenet", "what the backbone hands the head: imagenet, its 1000-d ImageNet output "
                            "(the design), or pooled, the pooled features before it (512-d ResNet18, 1280-d "
                            "EfficientNet-Lite)", one_of(FEATURES), choices=FEATURES)
    backbone_lr_scale: float = setting(1.0, "the backbone's learning rate as a fraction of --lr, the head's being "
                                       "--lr; 0 freezes the backbone (its BatchNorm statistics too) and trains only "
                                       "what sits on it", number(0, 1), type=float)
    probe_epochs: int = setting(0, "epochs at the start that train only what sits on the backbone (a linear probe: "
                                "its weights and BatchNorm statistics stay as loaded), then the whole network "
                                "(LP-FT, Kumar et al. 2022); 0: the whole network from the start", at_least(0),
                                type=int)
    ema: float = setting(0.0, "decay of an exponential moving average of the weights, which validation, best.pth "
                         "and the evaluation use (timm's ModelEmaV3, its decay warming up from 0 to this); 0: off",
                         Rule(lambda v: _finite(v) and 0 <= v < 1, "a number from 0 up to, not including, 1"),
                         type=float)
    extra_train: list = setting([], "other labelled data sets to train on as well (each a split folder, all its "
                                "splits, or a folder with 0/ and 1/). Validation and test stay --data's, and its "
                                "images that are near copies of theirs are left out",
                                Rule(lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
                                     "a list of folders"), nargs="+", metavar="FOLDER")

    def as_dict(self):
        return asdict(self)


STUDY = RunConfig()
SETTINGS = {f.name: f for f in fields(RunConfig)}
RULES = {name: setting_.metadata["rule"] for name, setting_ in SETTINGS.items()}  # each setting's Rule
# Settings added while checkpoints.FORMAT is 2: a last.pth or config.yaml without one ran with its
# default. (Bump FORMAT instead when a later setting changes what a file must hold.)
LATER_SETTINGS = ("ema", "probe_epochs")
SAVED_SETTINGS = tuple(name for name in SETTINGS if name not in LATER_SETTINGS)  # in every saved config
# What evaluation needs of a checkpoint's config; the other settings take the study's value if absent.
MODEL_KEYS = ("loss", "image_size", "seed", "benign_limit", "embed_dim")

COMMAND_FLAGS = {
    "project": Flag("folder for this run's outputs/ and results/"),
    "data": Flag("split folder made by to_subdirectories.py (train_data, validation_data, test_data, each with "
                 "0/ and 1/)"),
    "checkpoint": Flag("checkpoint to use (default PROJECT/outputs/best.pth)"),
    "checkpoints": Flag("two or more checkpoints used as an ensemble, e.g. each seed's outputs/best.pth: an image's "
                        "P(malignant) is the mean of theirs", options={"nargs": "+", "metavar": "PATH"}),
    "gallery": Flag("a clinic's own labelled images (FOLDER/0 and FOLDER/1, or a split folder, pooled) as the "
                    "gallery: they set the threshold and P(malignant)'s calibration too, by cross-fitting; nothing "
                    "is retrained", options={"metavar": "FOLDER"}),
    "out": Flag("output folder"),
    "device": Flag("auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps", default="auto"),
    "workers": Flag("DataLoader worker processes", at_least(0), options={"type": int}),
    "cache": Flag("keep the images decoded and resized in a memory-mapped uint8 file under DIR, built once and "
                  "reused by later runs (rebuilt when the files or the size change)", options={"metavar": "DIR"}),
    "score": Flag("how an image's P(malignant) is computed: gallery, head-knn, knn, prototype, direct or probe "
                  "(predict.py --help says what each is; auto: the loss's own). Several: the first gives the "
                  "figures and the main metrics, the others are scored from the same embeddings into "
                  "metrics.json's other_scores", default=["auto"],
                  options={"choices": SCORES, "nargs": "+", "metavar": "METHOD"}),
    "target_sensitivity": Flag("choose the threshold that reaches this sensitivity on validation (default: "
                               "maximise Youden's J)", number(0, 1, low_open=True), options={"type": float}),
    "save_every": Flag("save every N-th test pair as prediction_results_<i>.png", at_least(1), default=100,
                       options={"type": int}),
    "no_amp": Flag("disable mixed precision on CUDA (bf16, or fp16 with a scaler)", options={"action": "store_true"}),
    "force": Flag("start over: replace what an earlier run wrote there", options={"action": "store_true"}),
    "recipe": Flag("a recipe from recipes/ (study: the design's settings; tuned: the best Siamese setting found on "
                   "HAM10000 validation from random weights; transfer: for fine-tuning --weights imagenet; long: "
                   "transfer for 6 epochs with dermoscopy augmentation and flip TTA), or a recipe file. Each "
                   "setting below lists its value under each recipe; a flag given explicitly overrides it",
                   default="study"),
    "config": Flag("a YAML file of settings (e.g. another run's outputs/config.yaml), applied over the recipe; "
                   "a flag given explicitly overrides it", options={"metavar": "FILE"}),
}


def read_yaml(path, flag):
    """A settings file as a dict whose keys are RunConfig's, each value valid, else one line naming it."""
    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise ValueError(f"{flag} {path}: not a readable YAML file ({str(error).splitlines()[0]}); "
                         f"pass a file like recipes/transfer.yaml") from None
    if not isinstance(values, dict):
        raise ValueError(f"{flag} {path}: holds no 'setting: value' lines; pass a file like recipes/transfer.yaml")
    for key, value in values.items():
        if key not in SETTINGS:
            raise ValueError(f"{flag} {path}: {key!r} is not a setting; the settings are train.py's flags "
                             f"(with _ for -)")
        values[key] = value = typed(key, value)
        if not RULES[key].test(value):
            raise ValueError(f"{flag} {path}: {key} = {value!r}, expected {RULES[key].what}")
    return values


def typed(key, text):
    """A setting's value read as its flag reads it: YAML takes `lr: 1e-3` for a string."""
    convert = (SETTINGS[key].metadata["flag"] or Flag("")).options.get("type")
    try:
        return convert(text) if convert and isinstance(text, str) else text
    except ValueError:
        return text  # the rule then says what it must be


def recipe_file(name):
    return Path(name) if name.endswith((".yaml", ".yml")) else RECIPE_FOLDER / f"{name}.yaml"


RECIPES = {path.stem: read_yaml(path, "recipe") for path in sorted(RECIPE_FOLDER.glob("*.yaml"))}


def shown(value):
    """A value as a user types it: 1e-5, 4000 1000 1000."""
    if isinstance(value, list):
        return " ".join(map(shown, value))
    return f"{value:g}".replace("e-0", "e-") if isinstance(value, float) else str(value)


def by_recipe(name):
    """A setting's value under each recipe, for its help: 'study: 1e-5; tuned: 0.001; ...'."""
    values = {recipe: {**STUDY.as_dict(), **settings}[name] for recipe, settings in RECIPES.items()}
    if len(set(map(shown, values.values()))) == 1:
        return f"study: {shown(values['study'])}"
    return "; ".join(f"{recipe}: {shown(value)}" for recipe, value in values.items())


def is_setting(name):
    """A RunConfig setting with a flag of its own (not one resolved from other flags, as --data)."""
    return name in SETTINGS and SETTINGS[name].metadata["flag"] is not None


def flag_of(name):
    """(Flag, default) of a flag name: a setting's or a command flag's."""
    if is_setting(name):
        setting_ = SETTINGS[name]
        return setting_.metadata["flag"], getattr(STUDY, name)
    return COMMAND_FLAGS[name], COMMAND_FLAGS[name].default


def make_parser(prog, description, names, defaults=None, helps=None, required=()):
    """The parser of a script taking these flags (RunConfig's or COMMAND_FLAGS' names). `defaults`
    and `helps` give a flag this script's default and meaning. train.py's settings say their
    value under each recipe ('study: 1e-5; transfer: 0.001; ...'), the others their default."""
    defaults, helps = defaults or {}, helps or {}
    parser = ArgumentParser(prog, description=description)
    for name in names:
        flag, default = flag_of(name)
        default = defaults.get(name, default)
        text = helps.get(name, flag.help)
        if prog == "train.py" and is_setting(name):
            if default not in (None, False, []) or any(name in recipe for recipe in RECIPES.values()):
                text += f" ({by_recipe(name)})"
        elif not (default is None or default is False or default in ([], "")) and "default" not in text:
            text += f" (default: {shown(default)})"
        options = {"required": True} if name in required else {"default": default}
        parser.add_argument("--" + name.replace("_", "-"), help=text, **options, **flag.options)
    return parser


def as_setting(name, value):
    """A flag's value as a config holds it: --benign-limit's one value for all three splits."""
    return list(value) * 3 if name == "benign_limit" and len(value) == 1 else value


def check_flags(args, names, rules=None):
    """Each named flag's value by its rule (`rules` gives a flag this script's own), before any
    work: one line naming the flag. A setting's flag keeps its setting's rule."""
    rules = rules or {}
    for name in names:
        value = getattr(args, name, None)
        rule = rules.get(name) or (RULES[name] if is_setting(name) else COMMAND_FLAGS[name].rule)
        if rule is not None and value is not None and not rule.test(as_setting(name, value)):
            raise ValueError(f"--{name.replace('_', '-')} {shown(value)}: must be {rule.what}")


def check_settings(config):
    """Each setting of a resolved config by its rule, named by its flag."""
    for name, rule in RULES.items():
        value = getattr(config, name)
        if not rule.test(value):
            raise ValueError(f"--{name.replace('_', '-')} {shown(value)}: must be {rule.what}")


def parse_with_recipe(parser, argv):
    """timm's _parse_args: --recipe and --config become the parser's defaults, then the command line is
    parsed over them. Returns the arguments with `given`: the flags typed on the command line."""
    first, _ = parser.parse_known_args(argv)
    try:
        file_values = read_yaml(first.config, "--config") if first.config else {}
        recipe = first.recipe if first.recipe != "study" or "recipe" not in file_values else file_values["recipe"]
        if not recipe_file(recipe).is_file():
            raise ValueError(f"--recipe {recipe}: no such recipe; choose one of {', '.join(RECIPES)} or pass a "
                             f"recipe file")
        values = {**read_yaml(recipe_file(recipe), "--recipe"), **file_values, "recipe": Path(recipe).stem}
    except ValueError as error:
        parser.error(str(error))
    parser.set_defaults(**{key: value for key, value in values.items() if key not in ("data", "score")})
    args = parser.parse_args(argv)
    # The flags typed on the command line, not defaulted: argparse fills in a default only where the
    # namespace it is given lacks the name, so a second parse into a namespace of markers tells.
    unset = object()
    typed = parser.parse_args(argv, argparse.Namespace(**dict.fromkeys(vars(args), unset)))
    args.given = {name for name, value in vars(typed).items() if value is not unset}
    return args


def from_dict(values, path, required=MODEL_KEYS):
    """A config read from a checkpoint or config.yaml at `path`: each required key present, every
    known key valid (else one ValueError naming the file), the study's value for what it lacks."""
    if not isinstance(values, dict):
        raise ValueError(f"{path}: its config is not a dict; the file was edited or damaged, "
                         f"use the one train.py wrote or train again")
    for key, rule in RULES.items():
        if key not in values and key in required:
            problem = f"has no {key!r}"
        elif key in values and not rule.test(values[key]):
            problem = f"has {key} = {values[key]!r}, expected {rule.what}"
        else:
            continue
        raise ValueError(f"{path}: its config {problem}; the file was edited or damaged, "
                         f"use the one train.py wrote or train again")
    return RunConfig(**{key: value for key, value in values.items() if key in SETTINGS})


def write_config(config, outputs):
    """PROJECT/outputs/config.yaml: the run's resolved settings, readable and reusable with --config."""
    text = yaml.safe_dump(config.as_dict(), sort_keys=False)
    write_text_atomic(Path(outputs) / CONFIG_FILE, f"# train.py's resolved settings; rerun with --config\n{text}")


def read_config(path):
    """A run's config.yaml as a RunConfig, every saved setting present and valid, else one ValueError."""
    try:
        values = yaml.safe_load(Path(path).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise ValueError(f"{path}: not a readable YAML file ({str(error).splitlines()[0]})") from None
    return from_dict(values, path, required=SAVED_SETTINGS)
