"""Shared fixtures: small synthetic volumes with awkward geometry, and the real data sets."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

SHARED_DATA = Path(os.environ.get("GUIDEDSEG_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
SHARED_SETS = ("openkbp-hn-ct", "chaos-t2-mri", "la-mri", "ct-abdomen-sample")


def shared_set(name: str) -> Path:
    """Path of a data set in ../shared/data; skips the test when it is not there."""
    path = SHARED_DATA / name
    if not (path / "dataset.json").is_file():
        pytest.skip(f"{path} not present")
    return path


def rotation(ax: float, ay: float, az: float) -> np.ndarray:
    """3x3 rotation matrix from angles (degrees) about x, then y, then z."""
    ax, ay, az = (math.radians(a) for a in (ax, ay, az))
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def oblique_case(size=(120, 110, 36), spacing=(0.83, 0.91, 3.3), angles=(12.0, -8.0, 25.0), seed=0):
    """A CT-like volume on an oblique, anisotropic grid with three organ-sized ellipsoids
    (values 1..3; semi-axes 18-45 mm, the size of a kidney to a small liver lobe).

    Returns (image int16, label uint8) sharing one grid.
    """
    rng = np.random.default_rng(seed)
    image = sitk.Image(list(size), sitk.sitkInt16)
    image.SetSpacing(spacing)
    image.SetOrigin((-23.456789, 101.234567, -57.891234))
    image.SetDirection(rotation(*angles).flatten().tolist())
    # Physical coordinates of every voxel, (z, y, x, 3).
    k, j, i = np.meshgrid(*(np.arange(n) for n in size[::-1]), indexing="ij")
    index = np.stack([i, j, k], axis=-1).astype(float)
    direction = np.reshape(image.GetDirection(), (3, 3))
    points = index * np.asarray(spacing) @ direction.T + np.asarray(image.GetOrigin())
    centre = points.reshape(-1, 3).mean(axis=0)
    label = np.zeros(size[::-1], np.uint8)
    for value, (offset, radii) in enumerate([((-15, 0, 0), (40, 30, 45)), ((25, 8, 0), (18, 22, 35)),
                                              ((0, -25, 10), (20, 18, 32))], start=1):
        d = (points - centre - np.asarray(offset)) / np.asarray(radii)
        label[(d ** 2).sum(-1) <= 1.0] = value
    values = np.where(label > 0, 40 + 20 * label, -100) + rng.normal(0, 15, label.shape)
    image = sitk.GetImageFromArray(values.astype(np.int16))
    image.SetSpacing(spacing)
    image.SetOrigin((-23.456789, 101.234567, -57.891234))
    image.SetDirection(rotation(*angles).flatten().tolist())
    label_image = sitk.GetImageFromArray(label)
    label_image.CopyInformation(image)
    return image, label_image


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * np.logical_and(a, b).sum() / total)


@pytest.fixture
def oblique():
    return oblique_case()
