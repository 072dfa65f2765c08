"""train.py's pieces: the command line, each loss learning on a tiny batch, the collapse guard
and the best-checkpoint rule; damaged data (broken files excluded and listed, a split without both
classes) and bad flags or projects, each stopped in one line before any work. Its saved state,
--resume and interruptions: test_train_state.py."""
import dataclasses
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import config
import distributed
import train
from dataset import ImageDataset, ShuffledBatches, BalancedBatches, collate_images, load_split, train_transform
from helpers import (BROKEN_FILES, ROOT, SUBPROCESS_ENV, TINY, assert_one_line, call_main, tiny,
                     train_argv)
from images import DataError
from config import RECIPES, RunConfig
from losses import LOSSES, build_model

FLAGS = ("--help", "--project", "--data", "--config", "--epochs", "--recipe", "--batch-size", "--val-batch-size",
         "--lr", "--weight-decay", "--optimizer", "--schedule", "--warmup-epochs", "--augment", "--aux-weight",
         "--backbone-lr-scale", "--probe-epochs", "--ema", "--sampler", "--image-size", "--extra-train",
         "--benign-limit", "--backbone", "--features", "--weights", "--loss", "--pairing", "--partners-per-class",
         "--embed-dim", "--margin", "--miner", "--per-class", "--select", "--gallery-size", "--score", "--tta",
         "--no-tta", "--k", "--target-sensitivity", "--save-every", "--device", "--seed", "--workers", "--cache",
         "--no-amp", "--compile", "--sync-bn", "--resume", "--accept-changed-data", "--force")


def test_help_explains_every_flag(parse_help, capsys):
    with pytest.raises(SystemExit) as stopped:
        train.parse_args(["--help"])
    assert stopped.value.code == 0
    entries = parse_help(capsys.readouterr().out)
    assert sorted(entries) == sorted(FLAGS)  # a new flag is documented here too
    assert [flag for flag, text in entries.items() if len(text.split()) < 3] == []  # each has a real help text
    # the study's settings, which the defaults reproduce, are named where they apply
    for flag, study in (("--epochs", "study: 20"), ("--batch-size", "study: 128"), ("--lr", "study: 1e-5"),
                        ("--image-size", "study: 224"), ("--benign-limit", "study: 4000 1000 1000")):
        assert study in entries[flag], flag


def test_defaults_are_the_studys(tmp_path):
    config = train.make_config(train.parse_args(["--project", "p", "--data", str(tmp_path)]))
    assert (config.epochs, config.batch_size, config.val_batch_size) == (20, 128, 16)
    assert (config.lr, config.weight_decay, config.image_size) == (1e-5, 1e-5, 224)
    assert config.loss == "bce" and config.weights == "imagenet"
    assert config.benign_limit == [4000, 1000, 1000]


@pytest.mark.parametrize("flags, message", [
    (["--image-size", "16"], "--image-size 16"), (["--batch-size", "0"], "--batch-size 0"),
    (["--loss", "bce", "--score", "direct"], "--score direct"), (["--benign-limit", "1", "2"], "--benign-limit"),
    (["--resume", "--force"], "--resume and --force"), (["--probe-epochs", "3", "--epochs", "3"], "--probe-epochs 3")])
def test_bad_flags_are_refused_with_the_flag_named(flags, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        train.check_args(train.parse_args(["--project", "p", "--data", str(tmp_path), *flags]))


@pytest.mark.parametrize("flag, value, key", [
    ("--epochs", "0", "epochs"), ("--val-batch-size", "0", "val_batch_size"), ("--embed-dim", "0", "embed_dim"),
    ("--partners-per-class", "1", "partners_per_class"), ("--per-class", "1", "per_class"),
    ("--backbone-lr-scale", "2.5", "backbone_lr_scale"), ("--k", "0", "k"), ("--batch-size", "1", "batch_size"),
    ("--ema", "1", "ema")])
def test_a_setting_is_refused_by_its_one_rule_naming_the_flag(flag, value, key, tmp_path):
    """The rule that checks a saved config (config.SETTINGS) checks the flag too."""
    with pytest.raises(ValueError) as refused:
        train.check_args(train.parse_args(["--project", "p", "--data", str(tmp_path), flag, value]))
    assert str(refused.value) == f"{flag} {value}: must be {config.SETTINGS[key].metadata['rule'].what}"


def test_every_setting_comes_from_the_flag_of_its_name(tmp_path):
    config = train.make_config(train.parse_args(["--project", "p", "--data", str(tmp_path), "--lr", "0.003",
                                                 "--backbone", "efficientnet_lite0", "--k", "7", "--epochs", "3"]))
    assert (config.lr, config.backbone, config.k, config.epochs) == (0.003, "efficientnet_lite0", 7, 3)
    assert set(config.as_dict()) == {setting.name for setting in dataclasses.fields(RunConfig)}


@pytest.mark.parametrize("loss", ["bce", "contrastive", "triplet", "ce"])
def test_each_loss_decreases_on_a_tiny_batch_within_a_few_steps(loss, tiny_data_dir):
    torch.manual_seed(0)
    # every pair or triplet of the batch (--miner all): the semihard miner's set changes from step
    # to step (none at all on some), so its loss does not fall steadily on one fixed batch
    config = train.make_config(train.parse_args(["--project", "p", "--data", str(tiny_data_dir), "--loss", loss,
                                                 "--weights", "none", "--image-size", "32", "--batch-size", "8",
                                                 "--per-class", "4", "--partners-per-class", "4", "--miner", "all"]))
    split = load_split(tiny_data_dir, "train")
    dataset = ImageDataset(split, train_transform(32), augment=False)
    sampler = (BalancedBatches(split.labels, 4, 0) if loss in ("contrastive", "triplet")
               else ShuffledBatches(split.labels, 8, 0, 4))
    batch = collate_images([dataset[item] for item in next(iter(sampler))])
    model = build_model(config)
    loss_of = LOSSES[loss](config, torch.tensor(1.5))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)  # small steps: a steady fall on one batch
    losses = []
    for _ in range(6):
        generator = torch.Generator().manual_seed(0)  # the same pairs every step: a fixed objective
        value, *_ = loss_of(model, train.on_device(batch, config, torch.device("cpu"), generator))
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        losses.append(value.item())
    assert losses[-1] < losses[0], losses


# ---------------------------------------------------------------------------------------------
# Recipes and the levers they set


def config_of(*flags, data="d"):
    return train.make_config(train.parse_args(["--project", "p", "--data", data, *flags]))


def test_study_recipe_is_the_default_and_the_designs_setting():
    config = config_of()
    assert config == config_of("--recipe", "study")
    assert (config.optimizer, config.schedule, config.warmup_epochs) == ("adam", "constant", 0.0)
    assert (config.augment, config.aux_weight, config.sampler, config.tta) == ("study", 0.0, "shuffled", False)
    assert config.gallery_size == 64 and config.score == "gallery"


def test_tuned_recipe_sets_its_levers_and_explicit_flags_override_it():
    config = config_of("--recipe", "tuned")
    for name, value in RECIPES["tuned"].items():
        assert getattr(config, name) == value, name
    assert config.recipe == "tuned"
    overridden = config_of("--recipe", "tuned", "--lr", "3e-4", "--aux-weight", "0", "--no-tta", "--sampler", "shuffled")
    assert (overridden.lr, overridden.aux_weight, overridden.tta, overridden.sampler) == (3e-4, 0.0, False, "shuffled")
    assert overridden.optimizer == "adamw"  # the rest of the recipe stays


def test_tuned_recipe_gives_the_auxiliary_loss_to_bce_only():
    assert config_of("--recipe", "tuned", "--loss", "triplet").aux_weight == 0.0
    assert config_of("--recipe", "tuned", "--loss", "ce").sampler == "balanced"
    assert config_of("--loss", "contrastive").sampler == "balanced"  # metric losses need both classes


@pytest.mark.parametrize("flags, message", [
    (["--aux-weight", "1", "--loss", "ce"], "--aux-weight"), (["--aux-weight", "1", "--pairing", "two-pass"], "--aux-weight"),
    (["--warmup-epochs", "-1"], "--warmup-epochs"), (["--gallery-size", "-1"], "--gallery-size -1"),
    (["--score", "head-knn", "--loss", "triplet"], "head-knn")])
def test_bad_lever_flags_are_refused(flags, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        train.check_args(train.parse_args(["--project", "p", "--data", str(tmp_path), *flags]))


def test_auxiliary_classifier_is_trained_with_the_pair_loss(tiny_data_dir):
    torch.manual_seed(0)
    config = config_of("--weights", "none", "--image-size", "32", "--aux-weight", "1", data=str(tiny_data_dir))
    model = build_model(config)
    assert model.classifier is not None and build_model(config_of("--weights", "none")).classifier is None
    split = load_split(tiny_data_dir, "train")
    dataset = ImageDataset(split, train_transform(32), augment=False)
    batch = collate_images([dataset[item] for item in next(iter(BalancedBatches(split.labels, 4, 0)))])
    pair_only = dataclasses.replace(config, aux_weight=0.0)
    model.eval()  # no dropout: both calls see the same network
    with torch.no_grad():
        generator = lambda: torch.Generator().manual_seed(0)  # noqa: E731  the same pairs for both
        cpu = torch.device("cpu")
        joint, *_ = LOSSES["bce"](config)(model, train.on_device(batch, config, cpu, generator()))
        pairs, *_ = LOSSES["bce"](pair_only)(model, train.on_device(batch, pair_only, cpu, generator()))
        class_logits = model.classifier(model.embed(batch[0])).squeeze(1)
        auxiliary = torch.nn.functional.binary_cross_entropy_with_logits(class_logits, batch[1].float())
    assert joint.item() == pytest.approx(pairs.item() + auxiliary.item(), rel=1e-4)


def test_dermoscopy_augmentation_flips_and_rotates():
    image = torch.zeros(3, 40, 40, dtype=torch.uint8)
    image[:, :20, :20] = 255  # a bright top-left quadrant
    bright = set()
    for seed in range(40):
        torch.manual_seed(seed)
        out = train_transform(32, "dermoscopy")(image)
        quadrants = [out[:, :16, :16], out[:, :16, 16:], out[:, 16:, :16], out[:, 16:, 16:]]
        bright.add(int(torch.stack([q.mean() for q in quadrants]).argmax()))
    assert bright == {0, 1, 2, 3}  # the study's horizontal flip alone reaches only two quadrants


def test_validation_during_training_scores_as_evaluation_does(tiny_data_dir):
    """train.validate and gallery.build_gallery (what evaluate scores with) go through one core,
    scoring.embed_and_score: with the same gallery they give the same validation AUC."""
    import gallery as galleries
    import scoring
    from metrics import auc_or_nan

    torch.manual_seed(0)
    config = config_of("--weights", "none", "--image-size", "32", "--gallery-size", "4", data=str(tiny_data_dir))
    model = build_model(config).eval()
    train_split, validation = load_split(tiny_data_dir, "train"), load_split(tiny_data_dir, "validation")
    cpu = distributed.RunContext(rank=0, world_size=1, device=torch.device("cpu"), outputs=Path("outputs"), workers=0)
    row = train.validate(model, train_split, validation, config, cpu, amp=False)
    embed = scoring.embedder(model, scoring.Embedding(32, config.val_batch_size, torch.device("cpu"), amp=False))
    gallery, scored = galleries.build_gallery(model, train_split, {"validation": validation}, embed,
                                              galleries.Scoring(4, config.score, config.k), seed=0)
    assert len(gallery["labels"]) == 8  # 4 gallery images per class
    assert row["val_auc"] == auc_or_nan(validation.labels, scored["validation"].scores)
    assert row["val_acc"] == scored["validation"].pair_summary["pair_accuracy"]


def test_score_takes_the_first_method_as_the_runs_own():
    assert config_of("--score", "knn", "gallery").score == config_of("--score", "knn").score == "knn"


def test_distributed_variables_without_peers_end_in_one_line_naming_them(monkeypatch):
    import datetime
    import socket

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    for key, value in {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(distributed, "DISTRIBUTED_TIMEOUT", datetime.timedelta(seconds=2))
    with pytest.raises(ValueError) as error:
        distributed.setup_distributed("cpu")
    message = str(error.value)
    assert "RANK=0, WORLD_SIZE=2" in message and f"MASTER_PORT={port}" in message and "torchrun" in message


def test_running_out_of_memory_names_the_flags_to_lower(tiny_data_dir, tmp_path, monkeypatch):
    def no_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 412316860416 bytes.")

    monkeypatch.setattr(train, "train_one_epoch", no_memory)
    with pytest.raises(SystemExit) as exit_:
        train.main(["--project", str(tmp_path / "p"), "--data", str(tiny_data_dir), *TINY])
    message = str(exit_.value.code)
    assert message.startswith("train.py: error: out of memory at --image-size 32 and --batch-size 8")
    assert message.endswith("lower --batch-size or --image-size") and "\n" not in message


def test_extra_training_data_is_counted_in_the_summary_and_its_copies_of_test_images_listed(tiny_data_dir, tmp_path,
                                                                                            capsys, quick_bootstrap):
    from test_dataset import extra_folder

    extra, test_image = extra_folder(tiny_data_dir, tmp_path)
    train.main(["--project", str(tmp_path / "p"), "--data", str(tiny_data_dir), "--extra-train", str(extra),
                *tiny(1)])
    out = capsys.readouterr().out
    assert re.search(r"^train +16 benign +13 malignant$", out, re.M)  # 8 + 5 + 3 benign, 6 + 4 + 3 malignant
    assert f"of which 15 from --extra-train {extra.resolve()}" in out
    assert "left out 1 --extra-train image(s) that are near copies" in out
    listed = (tmp_path / "p" / "outputs" / "near_copies_left_out.txt").read_text()
    assert listed.startswith(f"{extra.resolve() / 'train_data' / '1' / 'copy.jpg'}\t{test_image}")
    saved = torch.load(tmp_path / "p" / "outputs" / "best.pth", weights_only=True)["config"]
    assert saved["extra_train"] == [str(extra.resolve())]  # an evaluation rebuilds the same gallery


def test_test_images_copied_into_training_and_an_image_in_both_classes_are_said(tiny_data_dir, tmp_path, capsys,
                                                                               quick_bootstrap):
    import shutil

    data = Path(shutil.copytree(tiny_data_dir, tmp_path / "data"))
    test_image = sorted((data / "test_data" / "1").iterdir())[0]
    benign_image = sorted((data / "train_data" / "0").iterdir())[0]
    shutil.copy(test_image, data / "train_data" / "1" / "copied.jpg")
    shutil.copy(benign_image, data / "train_data" / "1" / "both.jpg")
    train.main(["--project", str(tmp_path / "p"), "--data", str(data), *tiny(1)])
    out = capsys.readouterr().out
    assert "warning: near copies of one image: both classes in train 1, train/test 1;" in out
    listed = (tmp_path / "p" / "outputs" / "near_copies.txt").read_text().splitlines()
    assert listed == [f"both classes in train\t{benign_image}\t{data / 'train_data' / '1' / 'both.jpg'}\t0 bits",
                      f"train/test\t{data / 'train_data' / '1' / 'copied.jpg'}\t{test_image}\t0 bits"]
    assert re.search(r"near copies +2 across splits or classes, listed in", out)  # in the closing summary


def test_resume_on_changed_data_is_refused_naming_the_split_unless_accepted(tiny_data_dir, tmp_path, capsys,
                                                                           quick_bootstrap):
    import shutil

    data = Path(shutil.copytree(tiny_data_dir, tmp_path / "data"))
    project = tmp_path / "p"
    train.main(["--project", str(project), "--data", str(data), *tiny(1)])
    saved = torch.load(project / "outputs" / "last.pth", weights_only=True)["data"]
    assert saved["train"]["images"] == 14 and set(saved) == {"train", "validation", "test"}
    shutil.copy(sorted((data / "train_data" / "1").iterdir())[0], data / "train_data" / "1" / "added.jpg")
    (sorted((data / "validation_data" / "0").iterdir())[0]).rename(data / "validation_data" / "0" / "renamed.jpg")
    resume = ["--project", str(project), "--data", str(data), "--resume", "--epochs", "2"]
    with pytest.raises(SystemExit) as stop:
        train.main(resume)
    assert str(stop.value.code) == (
        "train.py: error: --resume: --data is not the data the run began on (train has 15 images, the run began "
        "with 14; validation holds other images (as many as before)); resume on the data it began on, or pass "
        "--accept-changed-data to continue on these images anyway (its validation scores would compare different "
        "images)")
    capsys.readouterr()
    train.main([*resume, "--accept-changed-data"])  # said explicitly: continues on these images
    assert "resuming" in capsys.readouterr().out
    # the images the run now has, moved elsewhere, are the same data: resumed without the flag
    moved = Path(shutil.move(data, tmp_path / "moved"))
    train.main(["--project", str(project), "--data", str(moved), "--resume", "--epochs", "3"])
    assert "resuming" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Damaged data: broken files excluded and listed, a split without both classes stops the run


def test_training_run_summarises_exclusions_in_one_line_and_lists_them(reference_run):
    lines = [line for line in reference_run.stdout.splitlines() if "exclude" in line]
    assert len(lines) == 1, reference_run.stdout
    listing = reference_run.outputs / "excluded_images.txt"
    assert f"{len(BROKEN_FILES)} " in lines[0] and str(listing) in lines[0]
    rows = listing.read_text().splitlines()
    assert {Path(row.split("\t")[0]).name for row in rows} == BROKEN_FILES
    assert all(len(row.split("\t")) == 2 and row.split("\t")[1] for row in rows)  # path <TAB> reason


@pytest.fixture
def broken_data_copy(broken_data_dir, tmp_path):
    """A writable copy of the session's data with broken files."""
    return Path(shutil.copytree(broken_data_dir, tmp_path / "data"))


def _empty_class_folder(data):
    for path in (data / "validation_data" / "1").iterdir():
        path.unlink()
    return data / "validation_data" / "1", "no usable malignant"


def _missing_split_folder(data):  # a missing test split is allowed (then validation is reported)
    shutil.rmtree(data / "validation_data")
    return data / "validation_data", "missing"


def _one_class_only(data):  # every malignant training file is broken
    for path in (data / "train_data" / "1").glob("SYN_*"):
        path.write_bytes(b"")
    return data / "train_data" / "1", "no usable malignant"


@pytest.mark.parametrize("damage", [_empty_class_folder, _missing_split_folder, _one_class_only])
def test_split_without_both_classes_stops_before_training(broken_data_copy, tmp_path, damage, no_test_eval):
    folder, what = damage(broken_data_copy)
    split = {"train_data": "train", "validation_data": "validation", "test_data": "test"}[
        folder.relative_to(broken_data_copy).parts[0]]
    with pytest.raises(DataError, match=what) as error:
        load_split(broken_data_copy, split)
    assert str(folder) in str(error.value)
    status, message = call_main(train.main, train_argv(tmp_path / "project", broken_data_copy))
    assert status != 0
    assert message.startswith("train.py: error:") and str(folder) in message
    assert "to_subdirectories.py" in message  # and what to do
    assert not list((tmp_path / "project").rglob("*.pth"))  # stopped before training


def test_class_of_only_broken_files_says_they_were_excluded(broken_data_copy, tmp_path, no_test_eval):
    _one_class_only(broken_data_copy)
    project = tmp_path / "project"
    status, message = call_main(train.main, train_argv(project, broken_data_copy))
    assert status != 0
    # the 6 emptied images and not_a_jpeg.jpg; .DS_Store is not an image file and not counted
    assert_one_line(message, f"train.py: error: {broken_data_copy / 'train_data' / '1'}: no usable malignant "
                             f"images (7 excluded as unusable, e.g. SYN_train_1_0000.jpg (empty file)); ")
    assert not list(project.rglob("*.pth"))  # stopped before training


def test_extra_class_folder_stops_training_in_one_line_naming_it(broken_data_copy, tmp_path, no_test_eval):
    extra = broken_data_copy / "train_data" / "2"  # its images would otherwise be dropped without a word
    extra.mkdir()
    for path in sorted((broken_data_copy / "train_data" / "1").glob("SYN_*"))[:3]:
        path.rename(extra / path.name)
    project = tmp_path / "project"
    status, message = call_main(train.main, train_argv(project, broken_data_copy))
    assert status != 0
    assert_one_line(message, f"train.py: error: {extra}:")
    assert not list(project.rglob("*.pth"))


# ---------------------------------------------------------------------------------------------
# Bad flags and projects: one line each, before any work


BAD_FLAGS = [
    ("does_not_exist", ["--data", "{tmp}/nowhere"], "--data"),
    ("image_size_below_32", ["--image-size", "16"], "--image-size 16"),
    ("batch_size_0", ["--batch-size", "0"], "--batch-size 0"),
    ("epochs_0", ["--epochs", "0"], "--epochs 0"),
    ("unknown_device", ["--device", "banana"], "--device banana"),
    pytest.param("cuda_absent", ["--device", "cuda"], "--device cuda", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="this machine has CUDA")),
    ("resume_without_last", ["--resume"], "--resume"),
    ("batch_size_1", ["--batch-size", "1"], "--batch-size 1"),  # BatchNorm needs two per batch
    ("lr_inf", ["--lr", "inf"], "--lr inf"),
    ("lr_nan", ["--lr", "nan"], "--lr nan"),
    ("weight_decay_nan", ["--weight-decay", "nan"], "--weight-decay nan"),
    ("margin_negative", ["--loss", "triplet", "--margin", "-1"], "--margin -1"),
    ("margin_nan", ["--loss", "contrastive", "--margin", "nan"], "--margin nan"),
    ("seed_negative", ["--seed", "-1"], "--seed -1"),
    ("workers_negative", ["--workers", "-1"], "--workers -1"),
]


@pytest.mark.parametrize("case, extra, flag", BAD_FLAGS)
def test_bad_flag_is_one_line_before_any_work(case, extra, flag, broken_data_dir, tmp_path, no_test_eval):
    project = tmp_path / "project"
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    status, message = call_main(train.main, train_argv(project, broken_data_dir, 2, *extra))
    assert status != 0
    assert_one_line(message, "train.py: error:")
    assert flag in message
    assert not project.exists()  # nothing created: refused before any work


def test_bad_flag_on_the_real_command_line(tmp_path):
    (tmp_path / "data").mkdir()  # beside the project, not holding it
    project = tmp_path / "project"
    result = subprocess.run([sys.executable, "train.py", *train_argv(project, tmp_path / "data", 2,
                                                                     "--device", "banana")],
                            cwd=ROOT, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=180)
    assert result.returncode == 1
    assert_one_line(result.stderr.strip(), "train.py: error: --device banana")
    assert result.stdout == ""
    assert not project.exists()


def test_a_project_that_is_a_file_gives_no_resume_advice(broken_data_dir, tmp_path, no_test_eval):
    (tmp_path / "file").write_text("not a folder")
    status, message = call_main(train.main, train_argv(tmp_path / "file", broken_data_dir, 1))
    assert status != 0
    assert_one_line(message, "train.py: error:")
    assert "--resume" not in message


def test_a_project_inside_its_data_is_refused_before_training(broken_data_dir, tmp_path, no_test_eval):
    data = Path(shutil.copytree(broken_data_dir, tmp_path / "data"))
    status, message = call_main(train.main, train_argv(data / "runs" / "x", data, 1))
    assert status != 0
    assert_one_line(message, f"train.py: error: --project {data / 'runs' / 'x'}: overlaps --data")
    assert not (data / "runs").exists()
