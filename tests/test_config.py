"""config.py: every setting's default, rule and help written once; the parsers built from them; the
recipes and --config as parser defaults under the command line; config.yaml round trips."""
import ast
import dataclasses
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import config  # noqa: E402
import train  # noqa: E402
from config import RECIPES, STUDY, RunConfig, read_config, write_config  # noqa: E402

SCRIPTS = sorted(str(path.relative_to(ROOT)) for path in (*ROOT.glob("*.py"), *ROOT.glob("assets/*.py")))


def test_every_setting_has_a_rule_its_default_keeps_and_a_flag_with_help():
    for setting in fields(RunConfig):
        rule, flag = setting.metadata["rule"], setting.metadata["flag"]
        assert rule.test(getattr(STUDY, setting.name)), setting.name  # the study's value is valid
        if flag is not None:
            assert len(flag.help.split()) >= 3, setting.name


def test_each_flag_is_declared_once_in_the_repository():
    """add_argument of a literal flag name appears once; shared flags come from config.py's tables."""
    declared = {}
    for name in SCRIPTS:
        for node in ast.walk(ast.parse((ROOT / name).read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
                for arg in node.args:
                    if isinstance(arg, ast.Constant) and str(arg.value).startswith("--"):
                        declared.setdefault(arg.value, []).append(name)
    assert {flag: where for flag, where in declared.items() if len(where) > 1} == {}
    shared = {"--" + name.replace("_", "-") for name in (*config.SETTINGS, *config.COMMAND_FLAGS)}
    assert shared.isdisjoint(declared), shared & set(declared)


def test_the_recipes_are_yaml_files_of_valid_settings():
    assert {"study", "tuned", "transfer", "long"} <= set(RECIPES)
    assert RECIPES["study"] == {}  # the study's values are RunConfig's defaults, written once
    assert RECIPES["transfer"]["lr"] == 1e-3 and RECIPES["tuned"]["gallery_size"] == 0


def test_the_long_recipe_is_transfer_for_6_epochs_with_dermoscopy_augmentation_and_tta(tmp_path):
    argv = ["--project", "p", "--data", str(tmp_path)]
    long = train.make_config(train.parse_args([*argv, "--recipe", "long"]))
    flags = train.make_config(train.parse_args([*argv, "--recipe", "transfer", "--epochs", "6", "--augment",
                                                "dermoscopy", "--tta"]))
    assert long == dataclasses.replace(flags, recipe="long")


def test_a_recipe_is_the_parsers_defaults_and_a_typed_flag_wins(tmp_path):
    args = train.parse_args(["--project", "p", "--data", str(tmp_path), "--recipe", "transfer", "--lr", "0.01"])
    made = train.make_config(args)
    assert (made.optimizer, made.schedule, made.gallery_size) == ("adamw", "cosine", 256)  # the recipe's
    assert made.lr == 0.01 and args.given >= {"recipe", "lr"} and "optimizer" not in args.given


def test_the_auxiliary_weight_of_a_recipe_applies_to_bce_only(tmp_path):
    argv = ["--project", "p", "--data", str(tmp_path), "--recipe", "transfer"]
    assert train.make_config(train.parse_args(argv)).aux_weight == 1.0
    assert train.make_config(train.parse_args(argv + ["--loss", "ce"])).aux_weight == 0.0


def test_a_runs_config_yaml_trains_the_same_run_again(tmp_path):
    argv = ["--project", "p", "--data", str(tmp_path), "--recipe", "tuned", "--image-size", "96", "--seed", "3"]
    first = train.make_config(train.parse_args(argv))
    write_config(first, tmp_path)
    assert read_config(tmp_path / "config.yaml") == first
    again = train.make_config(train.parse_args(["--project", "q", "--data", str(tmp_path),
                                                "--config", str(tmp_path / "config.yaml")]))
    assert again == first
    changed = train.make_config(train.parse_args(["--project", "q", "--data", str(tmp_path), "--config",
                                                  str(tmp_path / "config.yaml"), "--epochs", "3"]))
    assert changed.epochs == 3 and changed.image_size == 96  # a typed flag still wins over the file


@pytest.mark.parametrize("content, message", [
    ("lr: [1, 2]\n", "lr = [1, 2], expected a finite number > 0"),
    ("learning_rate: 0.1\n", "'learning_rate' is not a setting"),
    ("- lr\n", "holds no 'setting: value' lines"),
    ("lr: [\n", "not a readable YAML file"),
])
def test_a_bad_config_file_is_one_line_naming_it(content, message, tmp_path, capsys):
    path = tmp_path / "mine.yaml"
    path.write_text(content)
    with pytest.raises(SystemExit) as stopped:
        train.parse_args(["--project", "p", "--data", str(tmp_path), "--config", str(path)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 2 and len(lines) == 1
    assert lines[0].startswith(f"train.py: error: --config {path}: ") and message in lines[0]


def test_an_unknown_recipe_is_one_line_listing_the_recipes(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--project", "p", "--data", str(tmp_path), "--recipe", "fast"])
    assert "--recipe fast: no such recipe; choose one of long, study, transfer, tuned" in capsys.readouterr().err


def test_a_recipe_file_of_ones_own(tmp_path):
    path = tmp_path / "long.yaml"
    path.write_text("epochs: 6\naugment: dermoscopy\nlr: 3e-4\n")  # YAML reads 3e-4 as text: taken as a number
    made = train.make_config(train.parse_args(["--project", "p", "--data", str(tmp_path), "--recipe", str(path)]))
    assert (made.epochs, made.augment, made.lr, made.weight_decay) == (6, "dermoscopy", 3e-4, STUDY.weight_decay)


def test_check_flags_names_the_flag_and_its_rule():
    class Args:
        workers, save_every, target_sensitivity, benign_limit = -1, 5, None, [2]
    with pytest.raises(ValueError, match=r"^--workers -1: must be an integer of at least 0$"):
        config.check_flags(Args, ("workers", "save_every", "target_sensitivity"))
    config.check_flags(Args, ("save_every", "benign_limit"))  # one --benign-limit value stands for all three
    Args.benign_limit = [1, 2]
    with pytest.raises(ValueError, match="--benign-limit 1 2: must be three integers >= 0"):
        config.check_flags(Args, ("benign_limit",))


def test_a_config_missing_a_setting_or_breaking_a_rule_is_one_line_naming_the_file(tmp_path):
    values = STUDY.as_dict()
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({**values, "image_size": 16}))
    with pytest.raises(ValueError, match=r"config.yaml: its config has image_size = 16, expected an integer of"):
        read_config(path)
    del values["lr"]
    path.write_text(yaml.safe_dump(values))
    with pytest.raises(ValueError, match="has no 'lr'"):
        read_config(path)
