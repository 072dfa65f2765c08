"""Draw the Siamese network's architecture figure.

    python assets/draw_architecture.py [--out PATH]

regenerates assets/architecture.png (matplotlib only, no network).
"""
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import FancyBboxPatch

OUT = Path(__file__).resolve().parent / "architecture.png"
sys.path.insert(0, str(OUT.parents[1]))  # the repository root, for files.py
from config import make_parser  # noqa: E402
from files import write_atomic  # noqa: E402

args = make_parser("draw_architecture.py", __doc__, ("out",), defaults={"out": OUT},
                   helps={"out": "the PNG to write (default assets/architecture.png)"}).parse_args()

# muted palette
INPUT = "#dbe7f0"
BACKBONE = "#cfe0cf"
FEATURE = "#eeeeee"
HEAD = "#f3e3c8"
OUTPUT = "#e8d3dc"
NOTE = "#f7f7f2"
EDGE = "#555555"


def box(ax, xy, w, h, text, color=FEATURE, size=8.5, weight="normal", style="-"):
    """Rounded box with centred text; returns (x, y, w, h) for arrows."""
    x, y = xy
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0,rounding_size=0.08",
                                facecolor=color, edgecolor=EDGE, linewidth=1.0, linestyle=style))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=size,
            fontweight=weight, linespacing=1.3)
    return (x, y, w, h)


def right(b, dy=0.0):
    return (b[0] + b[2], b[1] + b[3] / 2 + dy)


def left(b, dy=0.0):
    return (b[0], b[1] + b[3] / 2 + dy)


def top(b):
    return (b[0] + b[2] / 2, b[1] + b[3])


def bottom(b):
    return (b[0] + b[2] / 2, b[1])


def arrow(ax, a, b):
    """Arrow from point a to point b."""
    ax.annotate("", xy=b, xytext=a,
                arrowprops=dict(arrowstyle="-|>", color=EDGE, lw=1.1, shrinkA=0, shrinkB=0))


def note(ax, xy, w, h, title, lines):
    """Side-note box: bold title, then left-aligned lines."""
    box(ax, xy, w, h, "", NOTE)
    x, y = xy
    ax.text(x + 0.15, y + h - 0.14, title, ha="left", va="top", fontsize=8.8, fontweight="bold")
    ax.text(x + 0.15, y + h - 0.42, "\n".join(lines), ha="left", va="top", fontsize=8.3,
            linespacing=1.45)


fig, ax = plt.subplots(figsize=(12, 5))
ax.set_xlim(0, 12)
ax.set_ylim(0, 5.35)
ax.axis("off")
ax.text(6, 5.2, "Siamese ResNet18 for ISIC 2020 melanoma classification", ha="center",
        va="center", fontsize=11.5, fontweight="bold")

# inputs -> one shared backbone -> features
img1 = box(ax, (0.15, 3.63), 1.3, 0.84, "image 1\n224×224×3\ndermoscopy", INPUT)
img2 = box(ax, (0.15, 2.23), 1.3, 0.84, "image 2\n224×224×3\ndermoscopy", INPUT)
net = box(ax, (1.85, 1.95), 1.65, 2.8,
          "ResNet18\nbackbone\n\nshared weights\n(one network,\nused twice)\n\nImageNet-init,\nfine-tuned",
          BACKBONE)
arrow(ax, right(img1), (net[0], 4.05))
arrow(ax, right(img2), (net[0], 2.65))
f1 = box(ax, (3.95, 3.75), 1.0, 0.6, "f1\n1000-d")
f2 = box(ax, (3.95, 2.35), 1.0, 0.6, "f2\n1000-d")
arrow(ax, (net[0] + net[2], 4.05), left(f1))
arrow(ax, (net[0] + net[2], 2.65), left(f2))

cat = box(ax, (5.35, 2.9), 1.45, 0.9, "concat\n(f1, f2, f1·f2)\n3000-d")
arrow(ax, right(f1), left(cat, 0.2))
arrow(ax, right(f2), left(cat, -0.2))

# similarity head: a vertical stack inside a dashed group
hx, hw, hh, step = 7.2, 2.55, 0.32, 0.46
layers = ["Linear(3000, 64)", "BatchNorm1d(64, momentum=0.25)", "LeakyReLU",
          "AlphaDropout(0.5)", "Linear(64, 1)", "Sigmoid"]
y0 = 4.2
ybot = y0 - (len(layers) - 1) * step
box(ax, (hx - 0.15, ybot - 0.12), hw + 0.3, y0 + hh + 0.32 - (ybot - 0.12), "", NOTE, style="--")
ax.text(hx + hw / 2, y0 + hh + 0.07, "similarity head", ha="center", va="bottom",
        fontsize=8.8, fontweight="bold")
prev = None
for i, name in enumerate(layers):
    b = box(ax, (hx, y0 - i * step), hw, hh, name, HEAD, size=7.5)
    if prev:
        arrow(ax, bottom(prev), top(b))
    else:
        arrow(ax, right(cat), left(b))
    prev = b

sim = box(ax, (10.1, prev[1] + hh / 2 - 0.32), 1.8, 0.64, "similarity ∈ [0, 1]", OUTPUT,
          weight="bold")
arrow(ax, right(prev), left(sim))
bce = box(ax, (10.1, 2.9), 1.8, 1.3, "BCE loss vs target\n\n1 = same class\n0 = different class",
          OUTPUT)
arrow(ax, top(sim), bottom(bce))

# notes: image-level probability and the alternative heads
note(ax, (0.15, 0.1), 5.0, 1.22, "Image-level P(malignant)", [
    "compare an image with a gallery of training images",
    "(benign and malignant) through the head",
])
note(ax, (5.45, 0.1), 6.45, 1.22, "Alternative heads (train.py --loss)", [
    "--loss contrastive|triplet: Linear(1000, 128) + L2-normalise,",
    "        pytorch-metric-learning loss + miner",
    "--loss ce: Linear(1000, 1) on single images (baseline)",
])

write_atomic(args.out, lambda tmp: fig.savefig(tmp, dpi=150, bbox_inches="tight", facecolor="white"))
print(f"wrote {args.out}")
