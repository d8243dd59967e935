"""Draw the README's picture: axial, coronal and sagittal slices of phantom seed 0 with its labels.

usage: python Testing/draw_readme_figure.py [OUT.png]   (needs matplotlib)
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import SimpleITK as sitk
from matplotlib.colors import ListedColormap

from GuidedSegLib.labels import FLARE22_LABELS, label_colour
from GuidedSegLib.phantoms import generate_phantom


def main(out: Path) -> None:
    phantom = generate_phantom(0)
    image = np.clip(sitk.GetArrayFromImage(phantom.image), -200, 300)  # (z, y, x), LPS
    label = sitk.GetArrayFromImage(phantom.label)
    sx, sy, sz = phantom.image.GetSpacing()
    colours = ListedColormap([(0, 0, 0, 0)] + [(*label_colour(n), 0.55) for n in FLARE22_LABELS.values()])
    z = int(np.argmax((label == 1).sum(axis=(1, 2))))
    y = int(np.argmax((label > 0).sum(axis=(0, 2))))
    x = int(np.argmax((label == 2).sum(axis=(0, 1))))
    views = [  # each flipped so superior is up and patient right is on the image left
        ("axial", image[z], label[z], sx / sy),
        ("coronal", image[::-1, y], label[::-1, y], sz / sx),
        ("sagittal", image[::-1, :, x], label[::-1, :, x], sz / sy),
    ]
    figure, axes = plt.subplots(1, 3, figsize=(10.5, 3.6), facecolor="black")
    for axis, (title, grey, labels, aspect) in zip(axes, views):
        axis.imshow(grey, cmap="gray", aspect=aspect, interpolation="nearest")
        axis.imshow(labels, cmap=colours, vmin=0, vmax=13, aspect=aspect, interpolation="nearest")
        axis.set_title(title, color="white")
        axis.axis("off")
    handles = [plt.Rectangle((0, 0), 1, 1, color=label_colour(n)) for n in FLARE22_LABELS.values()]
    figure.legend(handles, [n.replace("_", " ") for n in FLARE22_LABELS.values()], loc="lower center", ncol=7,
                  fontsize=7, frameon=False, labelcolor="white")
    figure.subplots_adjust(left=0.01, right=0.99, top=0.9, bottom=0.16, wspace=0.03)
    figure.savefig(out, dpi=110, facecolor="black")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parents[1] / "GuidedSeg/Resources/Images/phantom.png"))
