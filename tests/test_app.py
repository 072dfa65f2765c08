"""app.py: the page's request handlers called directly (CPU, seconds), its command line, and the
page itself in Debian's Chromium driven by Playwright (skipped without gradio, playwright or
/usr/bin/chromium)."""
import importlib.util
import io
import re
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import app
import ensemble
import plots
import gallery
import predict
from helpers import ROOT, SUBPROCESS_ENV, run_script

pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # bomb.jpg is the subject

SCREENSHOT = importlib.util.spec_from_file_location("screenshot_app", ROOT / "assets" / "screenshot_app.py")
page_tools = importlib.util.module_from_spec(SCREENSHOT)
SCREENSHOT.loader.exec_module(page_tools)


def rgb(size=(40, 36), seed=0):
    return (np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype(np.uint8)


def jpeg_bytes(mode="RGB", size=(40, 36)):
    buffer = io.BytesIO()
    Image.fromarray(rgb(size)).convert(mode).save(buffer, format="JPEG")
    return buffer.getvalue()


def huge_header_jpeg():
    """A small JPEG whose start of frame claims 12000 x 12000 pixels."""
    data = bytearray(jpeg_bytes())
    frame = data.find(b"\xff\xc0")
    data[frame + 5:frame + 9] = (12_000).to_bytes(2, "big") * 2
    return bytes(data)


def png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


BAD_UPLOADS = {  # name: (file content, what the page says)
    "notes.jpg": (b"not an image at all", "not an image"),
    "empty.jpg": (b"", "empty file"),
    "truncated.jpg": (jpeg_bytes()[:300], "truncated"),  # PIL: "Truncated File Read"
    "bomb.jpg": (huge_header_jpeg(), "too large (12000x12000)"),
    "dot.png": (png_bytes(Image.new("RGB", (1, 1), "red")), "too small (1x1)"),
}
def gif_bytes(frames=3):
    buffer = io.BytesIO()
    images = [Image.fromarray(rgb()).rotate(90 * i) for i in range(frames)]
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:])
    return buffer.getvalue()


CONVERTED_UPLOADS = {  # name: (file content, the note the result carries)
    "animated.gif": (gif_bytes(), "an animated image: its first frame is checked"),
    "animated.jpg": (gif_bytes(), "an animated image: its first frame is checked"),  # a GIF under a .jpg name
    "cmyk.jpg": (jpeg_bytes("CMYK"), "CMYK"),
    "deep.png": (png_bytes(Image.fromarray((rgb()[..., 0].astype(np.uint16) * 257))), "16-bit"),
    "alpha.png": (png_bytes(Image.fromarray(rgb()).convert("RGBA")), "transparency dropped"),
}


@pytest.fixture(scope="module")
def checkpoint(trained_project):
    return trained_project[0] / "outputs" / "best.pth"


@pytest.fixture(scope="module")
def checker(checkpoint):
    return app.LesionChecker([checkpoint], device="cpu")


@pytest.fixture(scope="module")
def lesion(tiny_data_dir):
    return sorted((tiny_data_dir / "test_data" / "1").glob("*.jpg"))[0]


def files_of(folder):
    """{path: (size, modification time)} of everything under folder."""
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(Path(folder).rglob("*"))}


def write_upload(folder, name, content):
    path = Path(folder) / name
    path.write_bytes(content)
    return str(path)


# ---------------------------------------------------------------------------------------------
# One image


def test_one_image_shows_what_predict_computes(checker, checkpoint, lesion):
    text, seen, overlay, nearest = checker.check_one(str(lesion))
    printed = predict.predict_images(checkpoint, [lesion], device="cpu")[0]
    # the calibrated probability, verdict and threshold exactly as predict.py --image prints them
    assert text.splitlines()[0] == "### " + printed.removesuffix(f"  {lesion}")
    assert re.match(r"### P\(malignant\) <?\d\.\d{2,6}  (benign|malignant)  \(malignant from", text)
    expected, = predict.predict_files(checker.model, checker.config, checker.gallery, [lesion], checker.device,
                                      checkpoint)
    assert seen.shape == overlay.shape == (256, 256, 3) and overlay.dtype == np.uint8  # 32 px, 8 times
    assert np.array_equal(overlay, app.enlarged(plots.heat_overlay(expected.image, expected.heat)))
    assert len(nearest) == 5
    for (thumbnail, caption), (path, label, similarity) in zip(nearest, expected.nearest):
        assert thumbnail.shape == (96, 96, 3)
        assert caption == f"{('benign', 'malignant')[label]} {similarity:.3f} · {Path(path).name}"


def test_an_ensemble_shows_what_ensemble_py_prints_and_the_first_model_explains(checkpoint, second_project, lesion,
                                                                                  tmp_path):
    checkpoints = [checkpoint, second_project / "outputs" / "best.pth"]
    checker = app.LesionChecker(checkpoints, device="cpu")
    text, seen, overlay, nearest = checker.check_one(str(lesion))
    printed = ensemble.predict_images(checkpoints, [lesion], device="cpu")[0]
    assert text.splitlines()[0] == "### " + printed.removesuffix(f"  {lesion}")
    assert "the mean of 2 models" in text and "(the first model's gallery)" in text.splitlines()[1]
    first, = predict.predict_files(checker.model, checker.config, checker.gallery, [lesion], checker.device,
                                   checkpoint)
    assert np.array_equal(overlay, app.enlarged(plots.heat_overlay(first.image, first.heat)))
    assert [caption for _, caption in nearest] == [f"{('benign', 'malignant')[label]} {similarity:.3f} · "
                                                   f"{Path(path).name}" for path, label, similarity in first.nearest]
    described = checker.describe()
    assert described.startswith(f"Ensemble of 2 models (`{checkpoints[0]}`, `{checkpoints[1]}`)")
    assert f"threshold **{checker.threshold:.4f}**" in described and "not a diagnosis" in described
    with pytest.raises(ValueError, match="--gallery: serves one model"):
        app.LesionChecker(checkpoints, device="cpu", clinic=tmp_path)


def test_the_page_is_handed_each_image_as_a_file_written_once(checker, lesion):
    text, seen, overlay, nearest = checker.check_one(str(lesion))
    shown_text, seen_file, overlay_file, cards = checker.show_one(str(lesion))
    assert shown_text == text
    for array, path in [(seen, seen_file), (overlay, overlay_file), *[(t, p) for (t, _), (p, _) in zip(nearest, cards)]]:
        assert Path(path).parent == checker.images_dir and np.array_equal(np.array(Image.open(path)), array)
    assert [caption for _, caption in cards] == [caption for _, caption in nearest]
    written = {path: Path(path).stat().st_mtime_ns for path in [seen_file, overlay_file, *(p for p, _ in cards)]}
    again = checker.show_one(str(lesion))  # the same images: the same files, not written again
    assert [again[1], again[2], *(p for p, _ in again[3])] == list(written)
    assert all(Path(path).stat().st_mtime_ns == ns for path, ns in written.items())


def test_a_gallery_image_moved_since_training_is_grey_with_its_name(tmp_path):
    thumbnail, caption = app.gallery_card(str(tmp_path / "gone.jpg"), 1, 0.8123)
    assert thumbnail.shape == (96, 96, 3) and (thumbnail == 200).all()
    assert caption == "malignant 0.812 · gone.jpg"
    assert app.gallery_card(None, 0, 0.5)[1] == "benign 0.500 · (path not stored)"


def test_examples_are_the_first_lesions_of_each_class_of_the_models_test_split(checker, tiny_data_dir, tmp_path):
    benign, malignant = (sorted((tiny_data_dir / "test_data" / c).glob("*.jpg"))[:2] for c in "01")
    assert checker.examples == [(str(p), f"benign · {p.name}") for p in benign] + \
        [(str(p), f"melanoma · {p.name}") for p in malignant]
    assert app.example_lesions(tmp_path / "gone") == []  # the data is not on this machine: no examples, no error


def test_the_page_names_the_threshold_and_its_rule(checker):
    described = checker.describe()
    assert f"threshold **{checker.gallery['threshold']:.4f}**" in described
    assert "Youden's J" in described and "not a diagnosis" in described
    prevalence = checker.gallery["calibration"]["prevalence"]
    assert f"calibrated on a validation split where {prevalence:.0%} are melanomas" in described
    assert "sensitivity 0.9 on the validation split" in app.threshold_rule({"target_sensitivity": 0.9})


@pytest.mark.parametrize("name", BAD_UPLOADS)
def test_bad_upload_is_one_line_on_the_page(checker, tmp_path, name):
    content, what = BAD_UPLOADS[name]
    text, seen, overlay, nearest = checker.check_one(write_upload(tmp_path, name, content))
    assert text.startswith(f"**Cannot check {name}:** ") and what.lower() in text.lower(), text
    assert "\n" not in text and "Traceback" not in text
    assert (seen, overlay, nearest) == (None, None, [])


@pytest.mark.parametrize("name", CONVERTED_UPLOADS)
def test_unusual_image_modes_are_checked_and_say_what_was_converted(checker, tmp_path, name):
    content, note = CONVERTED_UPLOADS[name]
    text, seen, overlay, nearest = checker.check_one(write_upload(tmp_path, name, content))
    assert re.match(r"### P\(malignant\) <?0\.", text) and note in text, text
    assert seen.shape == (256, 256, 3) and len(nearest) == 5


def test_no_upload_and_an_unexpected_error_are_one_line(checker, lesion, monkeypatch, capsys):
    assert checker.check_one(None)[0] == "**Cannot check this upload:** no file uploaded."

    def broken(*args, **kwargs):
        raise RuntimeError("something inside torch")

    monkeypatch.setattr(app, "predict_files", broken)
    text, *_ = checker.check_one(str(lesion))
    assert text == f"**Cannot check {lesion.name}:** something inside torch."
    assert "RuntimeError" in capsys.readouterr().err  # the details stay in the terminal


def test_the_page_keeps_serving_after_bad_uploads(checker, tmp_path, lesion):
    for name, (content, _) in BAD_UPLOADS.items():
        checker.check_one(write_upload(tmp_path, name, content))
    assert re.match(r"### P\(malignant\) <?0\.", checker.check_one(str(lesion))[0])


def test_requests_load_nothing_again(checker, lesion, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("loaded per request")

    for name in ("load_checkpoint", "prediction_gallery", "load_predictor"):
        monkeypatch.setattr(predict, name, no_loading)
    for name in ("load_gallery", "build_gallery"):
        monkeypatch.setattr(gallery, name, no_loading)
    assert checker.check_one(str(lesion))[0].startswith("### P(malignant)")
    assert checker.check_pair(str(lesion), str(lesion)).startswith("### similarity")


# ---------------------------------------------------------------------------------------------
# Two images


def test_pair_shows_what_predict_pair_prints(checker, checkpoint, tiny_data_dir):
    first, second = sorted((tiny_data_dir / "test_data" / "0").glob("*.jpg"))[:2]
    printed = predict.predict_pair(checkpoint, first, second, device="cpu")
    similarity, verdict = re.match(r"similarity (\d\.\d{4}) -> (same class|different classes)", printed).groups()
    assert checker.check_pair(str(first), str(second)).startswith(f"### similarity {similarity}: {verdict}\n")


def test_pair_with_a_bad_or_missing_upload_is_one_line(checker, tmp_path, lesion):
    assert checker.check_pair(str(lesion), None) == "Upload two images to compare them."
    text = checker.check_pair(str(lesion), write_upload(tmp_path, "notes.jpg", b"text"))
    assert text == "**Cannot check notes.jpg:** not an image."


# ---------------------------------------------------------------------------------------------
# Nothing written, command line


def test_nothing_is_written_into_the_project(trained_project, tmp_path, lesion):
    project = trained_project[0]
    before = files_of(project)
    checker = app.LesionChecker([project / "outputs" / "best.pth"], device="cpu")
    checker.check_one(str(lesion))
    checker.check_pair(str(lesion), str(lesion))
    checker.check_one(write_upload(tmp_path, "notes.jpg", b"text"))
    assert files_of(project) == before


def test_every_flag_has_help(parse_help, capsys):
    with pytest.raises(SystemExit):
        app.parse_args(["--help"])
    entries = parse_help(capsys.readouterr().out)
    assert set(entries) == {"--help", "--project", "--checkpoint", "--checkpoints", "--data", "--gallery", "--device",
                            "--host", "--port"}
    assert all(entries.values()), entries


@pytest.mark.parametrize("argv, message", [
    ([], "app.py: error: pass --project P, --checkpoint PATH or --checkpoints PATH PATH ..."),
    (["--checkpoints", "a.pth"], "app.py: error: --checkpoints: give two or more models; --checkpoint serves one"),
    (["--checkpoints", "a.pth", "b.pth", "--checkpoint", "c.pth"], "app.py: error: --checkpoints: serves these "
                                                                   "models; drop --checkpoint and --project"),
    (["--checkpoints", "a.pth", "b.pth"], "app.py: error: a.pth: no such checkpoint; train one"),
    (["--project", "nowhere"], "app.py: error: nowhere/outputs/best.pth: no such checkpoint; train one"),
    (["--checkpoint", "c.pth", "--port", "0"], "app.py: error: --port 0: must be 1-65535"),
])
def test_command_line_mistakes_are_one_line(argv, message):
    with pytest.raises(SystemExit) as exit_:
        app.main(argv)
    assert str(exit_.value.code).startswith(message) and "\n" not in str(exit_.value.code)


def test_a_taken_port_is_one_line_before_the_model_loads(checkpoint, monkeypatch):
    monkeypatch.setattr(app, "LesionChecker", None)  # never reached
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as exit_:
            app.main(["--checkpoint", str(checkpoint), "--port", str(port)])
    message = str(exit_.value.code)
    assert message.startswith(f"app.py: error: --host 127.0.0.1 --port {port}: cannot serve there (")
    assert "\n" not in message


# ---------------------------------------------------------------------------------------------
# The page in a browser


def browser_missing():
    """Why the page cannot be driven here, or None."""
    for module in ("gradio", "playwright"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install -r requirements-app.txt playwright)"
    if not page_tools.CHROMIUM.is_file():
        return f"{page_tools.CHROMIUM} is missing (apt-get install chromium)"
    return None


def checker_examples(checkpoint):
    config = torch.load(checkpoint, weights_only=True)["config"]
    return app.example_lesions(config["data"])


@pytest.mark.skipif(browser_missing() is not None, reason=str(browser_missing()))
def test_the_page_in_chromium_shows_predicts_numbers_offline(checkpoint, lesion, tmp_path):
    from playwright.sync_api import sync_playwright

    printed = run_script("predict.py", "--checkpoint", checkpoint, "--image", lesion, "--out", tmp_path / "figures")
    # the calibrated probability, its verdict and threshold as predict.py prints them
    probability = re.match(r"(P\(malignant\) <?\d\.\d{2,6}  (benign|malignant)  \(malignant from \d\.\d{2,6})",
                           printed).group(1)
    not_an_image = write_upload(tmp_path, "notes.jpg", b"not an image at all")
    temp = tmp_path / "temp"  # the app's TMPDIR: its uploads and the images it shows go there
    temp.mkdir()
    project_before = files_of(checkpoint.parents[1])
    with page_tools.serve(checkpoint, tmp_path / "app.log", env={**SUBPROCESS_ENV, "TMPDIR": str(temp)}) as url, \
            sync_playwright() as playwright:
        browser = page_tools.launch_chromium(playwright)
        page, refused = page_tools.offline_page(browser, url)
        result = page_tools.check_image(page, url, lesion)
        assert " ".join(probability.split()) in " ".join(result.split())  # the page's markdown folds spaces
        assert page.locator("#heat img").get_attribute("src")
        page.locator("#nearest img").nth(4).wait_for()  # the five nearest gallery images, with captions
        assert page.locator("#nearest").get_by_text(re.compile(r"^(benign|malignant) 0\.\d{3} · ")).count() == 5
        page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        assert list(temp.glob(f"lesion-app-*/**/{lesion.name}")), "the upload is not in app.py's temporary folder"
        # an example of the model's test split, clicked, shows the same line predict.py prints for it
        example, caption = checker_examples(checkpoint)[-1]
        printed_example = run_script("predict.py", "--checkpoint", checkpoint, "--image", example,
                                     "--out", tmp_path / "figures").splitlines()[0]
        page.locator("#examples").get_by_text(caption).click()
        expected = " ".join(printed_example.removesuffix(f"  {example}").split())
        page.locator("#result").get_by_text(expected.split(";")[0]).wait_for(timeout=120_000)
        page.locator("#upload").get_by_label("Clear").click()
        page.locator("#upload input[type=file]").set_input_files(not_an_image)
        page.locator("#result").get_by_text("Cannot check notes.jpg: not an image").wait_for(timeout=60_000)
        assert page.locator("#heat img").count() == 0
        browser.close()
    assert refused == [], f"the page asked for outside addresses: {refused}"
    assert list(temp.glob("lesion-app-*")) == [], "app.py left its temporary folder"
    assert files_of(checkpoint.parents[1]) == project_before
    assert (tmp_path / "page.png").stat().st_size > 10_000
    assert "Traceback" not in (tmp_path / "app.log").read_text()


@pytest.mark.skipif(browser_missing() is not None, reason=str(browser_missing()))
def test_the_page_serves_concurrent_requests_whole(checkpoint, tiny_data_dir, tmp_path):
    """Three bursts of six requests at once on 127.0.0.1, the same lesions in each (so the same
    nearest gallery images): every answer complete, every image downloaded whole, no server error."""
    from concurrent.futures import ThreadPoolExecutor

    from gradio_client import Client, handle_file

    lesions = sorted((tiny_data_dir / "test_data" / "1").glob("*.jpg"))[:2]
    temp = tmp_path / "temp"
    temp.mkdir()
    with page_tools.serve(checkpoint, tmp_path / "app.log", env={**SUBPROCESS_ENV, "TMPDIR": str(temp)}) as url:
        client = Client(url, download_files=str(tmp_path / "downloads"), verbose=False)

        def ask(i):
            return client.predict(handle_file(str(lesions[i % 2])), api_name="/show_one")
        for _ in range(3):
            with ThreadPoolExecutor(6) as pool:
                answers = list(pool.map(ask, range(6)))
            for text, seen, overlay, nearest in answers:
                assert text.startswith("### P(malignant) ")
                for path in [seen, overlay, *(card["image"] for card in nearest)]:
                    with Image.open(path) as image:
                        image.load()  # a truncated download fails here
                assert len(nearest) == 5
    log = (tmp_path / "app.log").read_text()
    assert "Content-Length" not in log and "Traceback" not in log
