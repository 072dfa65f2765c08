"""A local web page to check one lesion with a trained model.

    python app.py --project runs/exp1                      # then open http://127.0.0.1:7860
    python app.py --checkpoint runs/exp1/outputs/best.pth --port 8000
    python app.py --checkpoints runs/s0/outputs/best.pth runs/s1/outputs/best.pth runs/s2/outputs/best.pth

One image in: P(malignant), the verdict at the model's saved threshold, the Grad-CAM heat map and
its five nearest gallery images with their class and similarity. Two images in: their
similarity and whether the model puts them in the same class. The numbers come from predict.py's
own functions (load_predictor, predict_files, compare_pair), so the page shows what
`predict.py --image` and `--pair` print.

With --checkpoints the page serves an ensemble: P(malignant) and the verdict are ensemble.py's
(the mean of the models' P(malignant), their threshold); the heat map, the nearest gallery images
and the pair tab are the first model's.

The model and its gallery are loaded once, at start. Uploads and the images the page shows
live in a temporary folder that is removed when the page stops; nothing is written into the
project. Gradio's analytics, version check and run history are off, so the page works offline.
Needs gradio: pip install -r requirements-app.txt (or make app).
"""
import contextlib
import hashlib
import io
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import numpy as np
from PIL import Image

from checkpoints import best_path
from config import make_parser
from dataset import CLASS_NAMES, has_split, list_split
from ensemble import ensemble_text, load_members, member_probabilities
from files import write_atomic
from images import DataError, check_image
from plots import gallery_thumbnail, heat_overlay
from predict import compare_pair, load_predictor, nearest_text, predict_files, probability_text

MIN_SIDE = 32  # the smallest --image-size train.py takes: a smaller upload is an icon, not a lesion photo
CONVERTED = {"CMYK": "a CMYK file, read as RGB", "RGBA": "transparency dropped",  # PIL mode: what reading changed
             "LA": "greyscale, transparency dropped", "L": "greyscale, read as RGB",
             "P": "a palette image, read as RGB", "I;16": "16-bit, read as 8-bit", "I;16B": "16-bit, read as 8-bit",
             "I": "16-bit, read as 8-bit"}
DISPLAY_SIDE = 256  # small model inputs (32 or 64 px) are shown enlarged, pixel for pixel
NOT_A_DIAGNOSIS = "A research model: its verdict is not a diagnosis."


def threshold_rule(gallery):
    """How the gallery's threshold was chosen."""
    target = gallery["target_sensitivity"]
    if target is None:
        return "Youden's J (sensitivity + specificity - 1) on the validation split"
    return f"the highest threshold reaching sensitivity {target:g} on the validation split"


def upload_problem(path):
    """Why an uploaded file cannot be checked, or None: predict.py's own check (check_image), and
    an image too small to be a lesion photo."""
    if not path:
        return "no file uploaded"
    reason = check_image(Path(path))
    if reason:
        return reason
    with Image.open(path) as image:
        width, height = image.size
    if min(width, height) < MIN_SIDE:
        return f"too small ({width}x{height}); a lesion photo needs at least {MIN_SIDE} px on each side"
    return None


def conversion_note(path):
    """What reading the file as 8-bit RGB changed, or ''."""
    with Image.open(path) as image:
        notes = [CONVERTED.get(image.mode), "an animated image: its first frame is checked"
                 if getattr(image, "n_frames", 1) > 1 else None]
    notes = [note for note in notes if note]
    return f" ({'; '.join(notes)})" if notes else ""


def refusal(path, reason):
    """The one line the page shows for an upload it cannot check."""
    return f"**Cannot check {Path(path).name if path else 'this upload'}:** {reason}."


class LesionChecker:
    """The loaded model (or models: an ensemble, the first of which explains), gallery and
    threshold, and the page's two requests. Requests take turns (one lock): Grad-CAM hooks into
    the model, so two at once would mix."""

    def __init__(self, checkpoints, data=None, device="auto", clinic=None, images_dir=None):
        self.checkpoints = [Path(checkpoint) for checkpoint in checkpoints]
        self.checkpoint = self.checkpoints[0]
        self.images_dir = Path(images_dir or tempfile.mkdtemp(prefix="lesion-app-images-"))
        self.images_dir.mkdir(parents=True, exist_ok=True)
        self.members, self.threshold = None, None  # an ensemble's models and threshold
        if len(self.checkpoints) > 1:
            if clinic:
                raise ValueError("--gallery: serves one model; drop it, or serve one --checkpoint")
            self.members, self.threshold = load_members(self.checkpoints, data, device)
            self.model, self.config, self.gallery, self.device = self.members[0]
        else:
            self.model, self.config, self.gallery, self.device = load_predictor(self.checkpoint, data, device, clinic)
        self.clinic = clinic
        self.examples = example_lesions(self.config.data)
        self.lock = threading.Lock()

    def describe(self):
        """The model line at the top of the page: what is served and how its threshold was chosen."""
        threshold = f"threshold **{self.gallery['threshold']:.4f}**, chosen by {threshold_rule(self.gallery)}"
        prevalence = self.gallery["calibration"]["prevalence"]
        if self.clinic:
            gallery = (f"the clinic's own gallery `{self.clinic}` ({len(self.gallery['labels'])} images, which also "
                       f"set the threshold and calibration)")
            source = "these images"
        else:
            gallery = f"a gallery of {len(self.gallery['labels'])} training images"
            source = "a validation split"
        if self.members:
            return (f"Ensemble of {len(self.members)} models ({', '.join(f'`{c}`' for c in self.checkpoints)}): "
                    f"P(malignant) is the mean of their P(malignant), each calibrated on a validation split where "
                    f"{prevalence:.0%} are melanomas, threshold **{self.threshold:.4f}**, chosen by "
                    f"{threshold_rule(self.gallery)}, applied to their mean. The heat map, the nearest images and "
                    f"the pair tab are the first model's ({self.config.loss}, {self.config.image_size} px, {gallery}). "
                    f"{NOT_A_DIAGNOSIS}")
        return (f"Model `{self.checkpoint}` ({self.config.loss}, {self.config.image_size} px), {gallery}, score "
                f"{threshold}. P(malignant) is calibrated on {source} where {prevalence:.0%} are melanomas: refit it "
                f"on your own clinic's images where that differs (--gallery). {NOT_A_DIAGNOSIS}")

    def check_one(self, path):
        """(result text, image as the network sees it, Grad-CAM overlay, [(thumbnail, caption)])
        of one uploaded file; a file it cannot check gives one line and no images."""
        reason = upload_problem(path)
        if reason:
            return refusal(path, reason), None, None, []
        try:
            with self.lock:
                prediction, = predict_files(self.model, self.config, self.gallery, [path], self.device,
                                            self.checkpoint)
                headline, nearest = probability_text(prediction, self.gallery), nearest_text(prediction)
                if self.members:  # the first model's P(malignant) is the explained prediction's
                    models = np.array([prediction.probability, *member_probabilities(
                        self.members[1:], self.checkpoints[1:], [path])[:, 0]])
                    headline = ensemble_text(models.mean(), self.threshold, models,
                                             self.gallery["calibration"]["prevalence"])
                    nearest += " (the first model's gallery)"
        except Exception as error:  # the page keeps serving; the terminal keeps the details
            return refusal(path, failure(error)), None, None, []
        text = f"### {headline}\n{nearest}; {Path(path).name}{conversion_note(path)}"
        image = (prediction.image * 255).round().astype(np.uint8)
        overlay = heat_overlay(prediction.image, prediction.heat)
        return (text, enlarged(image), enlarged(overlay),
                [gallery_card(*nearest) for nearest in prediction.nearest])

    def show_one(self, path):
        """check_one for the page: its images handed over as files (image_file), so that concurrent
        requests showing the same image never rewrite a file another one is downloading."""
        text, seen, overlay, nearest = self.check_one(path)
        shown = [None if image is None else image_file(image, self.images_dir) for image in (seen, overlay)]
        return text, *shown, [(image_file(thumbnail, self.images_dir), caption) for thumbnail, caption in nearest]

    def check_pair(self, first, second):
        """The result text for two uploaded files: their similarity and the model's verdict."""
        if not first or not second:
            return "Upload two images to compare them."
        for path in (first, second):
            reason = upload_problem(path)
            if reason:
                return refusal(path, reason)
        try:
            with self.lock:
                similarity, verdict = compare_pair(self.model, self.config, first, second, self.device)
        except Exception as error:
            return refusal(f"{Path(first).name} and {Path(second).name}", failure(error))
        return (f"### similarity {similarity:.4f}: {verdict}\n"
                f"same class above 0.5; {Path(first).name} and {Path(second).name}")


def failure(error):
    """A request's unexpected error as one line for the page; the traceback goes to the terminal."""
    if not isinstance(error, (ValueError, OSError)):  # DataError and WeightsError are ValueErrors
        traceback.print_exc()
    return " ".join(str(error).split()) or error.__class__.__name__


def enlarged(image):
    """An (H, W, 3) image repeated pixel for pixel up to about DISPLAY_SIDE, so that a 32 or 64 px
    input is not shown as a stamp; nothing is interpolated."""
    factor = max(1, DISPLAY_SIDE // max(image.shape[:2]))
    return image.repeat(factor, 0).repeat(factor, 1)


def image_file(image, folder):
    """An (H, W, 3) uint8 image as a PNG file in `folder`, named by its content and written once,
    atomically: Gradio rewrites its cached copy of an image array on every request that returns
    it, which a concurrent download of the same image could read half-written."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    data = buffer.getvalue()
    path = Path(folder) / f"{hashlib.sha256(data).hexdigest()[:32]}.png"
    if not path.exists():
        write_atomic(path, lambda tmp: tmp.write_bytes(data))
    return str(path)


def gallery_card(path, label, similarity):
    """A nearest gallery image as the page shows it: its image (grey where the file has
    moved since training) and a caption with its class and similarity."""
    name = Path(path).name if path else "(path not stored)"
    thumbnail = np.full((96, 96, 3), 200, np.uint8)
    if path and Path(path).is_file():
        with contextlib.suppress(DataError):  # a damaged file: grey too
            thumbnail = gallery_thumbnail(path)
    return thumbnail, f"{CLASS_NAMES[label]} {similarity:.3f} · {name}"


def offline_gradio(temp_dir):
    """gradio, imported with its analytics, version check and Hugging Face telemetry off and its
    uploads in temp_dir (these are read when gradio is imported)."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    os.environ["GRADIO_TEMP_DIR"] = str(temp_dir)
    import gradio
    return gradio


def example_lesions(data, per_class=2):
    """[(path, caption)]: the first `per_class` images of each class of the model's test split (its
    validation split where it has none), for a newcomer to click before finding an image of their
    own; none when the training data is not on this machine."""
    try:
        split = "test" if has_split(data, "test") else "validation"
        paths, labels = list_split(data, split)
    except (DataError, OSError, KeyError):
        return []
    return [(str(path), f"{('benign', 'melanoma')[label]} · {path.name}")
            for label in (0, 1) for path in [p for p, y in zip(paths, labels) if y == label][:per_class]]


def build_page(gr, checker):
    """The page: a tab for one lesion, a tab for two."""
    with gr.Blocks(title="Check one lesion", analytics_enabled=False, delete_cache=(600, 3600)) as page:
        gr.Markdown("# Check one lesion")
        gr.Markdown(checker.describe(), elem_id="model")
        with gr.Tab("One lesion"):
            with gr.Row():
                upload = gr.File(label="lesion image (drop or click)", type="filepath", elem_id="upload")
                result = gr.Markdown("Upload a dermoscopic image.", elem_id="result")
            with gr.Row():
                seen = gr.Image(label="image as the network sees it", type="filepath", interactive=False,
                                height=256, elem_id="seen")
                overlay = gr.Image(label="Grad-CAM: where the score came from (red = most)", type="filepath",
                                   interactive=False, height=256, elem_id="heat")
            nearest = gr.Gallery(label="nearest gallery images: class and similarity", columns=5, height=240,
                                 object_fit="contain", elem_id="nearest")
            upload.upload(checker.show_one, upload, [result, seen, overlay, nearest])
            if checker.examples:
                gr.Examples([[path] for path, _ in checker.examples], upload, [result, seen, overlay, nearest],
                            checker.show_one, cache_examples=False, run_on_click=True, elem_id="examples",
                            label="lesions of the model's test split: click one",
                            example_labels=[caption for _, caption in checker.examples])
            upload.clear(lambda: ("Upload a dermoscopic image.", None, None, []), None,
                         [result, seen, overlay, nearest])
        with gr.Tab("Two lesions"):
            with gr.Row():
                first = gr.File(label="first image", type="filepath", elem_id="first")
                second = gr.File(label="second image", type="filepath", elem_id="second")
            pair_result = gr.Markdown("Upload two images to compare them.", elem_id="pair-result")
            for upload_one in (first, second):
                upload_one.upload(checker.check_pair, [first, second], pair_result)
    return page


def check_address(host, port):
    """Refuse a port that is taken, or a host that is not this machine's, before the model loads."""
    try:
        family = socket.getaddrinfo(host, port)[0][0]
        with socket.socket(family) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the web server binds it
            probe.bind((host, port))
    except OSError as error:
        raise ValueError(f"--host {host} --port {port}: cannot serve there ({error.strerror or error}); "
                         f"choose another --port or --host") from None


def parse_args(argv=None):
    parser = make_parser(
        "app.py", __doc__, ("project", "checkpoint", "checkpoints", "data", "gallery", "device"),
        helps={"project": "project folder written by train.py (serves PROJECT/outputs/best.pth)",
               "checkpoint": "checkpoint to serve (default PROJECT/outputs/best.pth); its gallery.pt beside it "
                             "holds the gallery and the threshold",
               "data": "split folder to rebuild the gallery and threshold from when gallery.pt is missing or "
                       "unusable (as predict.py --data)"})
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to serve on (default 127.0.0.1: this machine only; 0.0.0.0 opens it "
                             "to the network)")
    parser.add_argument("--port", type=int, default=7860, help="port to serve on (default 7860)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    temp_dir = Path(tempfile.mkdtemp(prefix="lesion-app-"))
    try:
        if not 1 <= args.port <= 65535:
            raise ValueError(f"--port {args.port}: must be 1-65535")
        if args.checkpoints and (args.checkpoint or args.project):
            raise ValueError("--checkpoints: serves these models; drop --checkpoint and --project")
        if args.checkpoints and len({Path(path).resolve() for path in args.checkpoints}) < 2:
            raise ValueError("--checkpoints: give two or more models; --checkpoint serves one")
        checkpoints = args.checkpoints or [args.checkpoint or (args.project and best_path(args.project))]
        if not checkpoints[0]:
            raise ValueError("pass --project P, --checkpoint PATH or --checkpoints PATH PATH ...")
        for checkpoint in checkpoints:
            if not Path(checkpoint).is_file():
                raise ValueError(f"{checkpoint}: no such checkpoint; train one with train.py (make demo for "
                                 f"runs/demo)")
        check_address(args.host, args.port)
        try:
            gr = offline_gradio(temp_dir)
        except ImportError:
            raise ValueError("gradio is not installed; pip install -r requirements-app.txt (or make app)") from None
        started = time.time()
        checker = LesionChecker(checkpoints, args.data, args.device, args.gallery, temp_dir / "shown")
        print(f"loaded {' '.join(map(str, checkpoints))} and a gallery of {len(checker.gallery['labels'])} images "
              f"in {time.time() - started:.1f} s")
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` stops it like Ctrl+C: temp files go
        build_page(gr, checker).launch(server_name=args.host, server_port=args.port, share=False,
                                       run_history=False, footer_links=[], max_file_size="100mb",
                                       allowed_paths=sorted({str(Path(path).parent) for path, _ in checker.examples}))
    except ValueError as error:  # DataError and WeightsError too
        sys.exit(f"app.py: error: {error}")
    except OSError as error:  # the port was taken while the model loaded
        sys.exit(f"app.py: error: --port {args.port}: {error.strerror or error}")
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
