"""Shared fixtures: small synthetic volumes with awkward geometry, and the real data sets."""

from __future__ import annotations

import math
import os
import time
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


def skip_without_qt_panel():
    """For the real-Qt panel suites: skip the module unless slicer-core, torch and PySide6 are
    there (PySide6 installed but not loadable is a broken machine: an error, not a skip); the
    ``slicer`` module. Call before importing slicer_qt_adapter (it imports PySide6)."""
    import importlib.util

    slicer = pytest.importorskip("slicer")
    pytest.importorskip("torch")
    if not hasattr(slicer, "vtkMRMLScene"):
        pytest.skip("the 'slicer' module here is not slicer-core", allow_module_level=True)
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    if importlib.util.find_spec("PySide6") is None:
        pytest.skip("PySide6 is not installed (it comes with the test extras: pip install -e .[test])",
                    allow_module_level=True)
    try:
        from PySide6 import QtUiTools  # noqa: F401
    except ImportError as error:
        raise ImportError(f"PySide6 is installed but Qt does not load ({error}); on Debian/Ubuntu install "
                          "libegl1 libgl1 libxkbcommon0 libfontconfig1 libdbus-1-3") from error
    return slicer


def run_until_finished(logic, task: str, timeout: float = 30.0) -> list:
    """Poll a panel logic until its ``task`` job finishes; every update, in order."""
    updates = []
    deadline = time.monotonic() + timeout
    while not any(u.finished and u.task == task for u in updates):
        assert time.monotonic() < deadline, f"the panel's {task} did not finish in {timeout:.0f} s"
        updates += logic.poll()
        time.sleep(0.02)
    return updates


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * np.logical_and(a, b).sum() / total)


@pytest.fixture
def oblique():
    return oblique_case()


# ----------------------------------------------------------------------------------------------
# One small trained model for the whole session (the training test checks how well it learned;
# the inference and panel tests use its bundle).

THREE_ORGANS = {1: "liver", 2: "spleen", 3: "kidney"}


def three_organ_phantom(seed: int):
    """A coarse phantom (8 x 8 x 10 mm, so one crop holds the abdomen) whose label keeps three
    organs: liver, spleen, and both kidneys as one. Returns (image, label)."""
    from GuidedSegLib.phantoms import generate_phantom

    phantom = generate_phantom(seed, size=(48, 48, 32), spacing=(8.0, 8.0, 10.0))
    merge = np.zeros(14, np.uint8)
    merge[[1, 3, 2, 13]] = [1, 2, 3, 3]
    label = sitk.GetImageFromArray(merge[sitk.GetArrayFromImage(phantom.label)])
    label.CopyInformation(phantom.label)
    return phantom.image, label


@pytest.fixture(scope="session")
def three_organ_store(tmp_path_factory) -> Path:
    """4 labeled and 2 unlabeled three-organ phantoms."""
    from GuidedSegLib.store import CaseStore

    root = tmp_path_factory.mktemp("three") / "store"
    store = CaseStore.create(root, THREE_ORGANS)
    for i in range(6):
        image, label = three_organ_phantom(700 + i)
        if i < 4:
            store.add_labeled(image, label, f"case_{i}")
        else:
            store.add_unlabeled(image, f"case_{i}")
    return root


@pytest.fixture(scope="session")
def three_organ_run(three_organ_store, tmp_path_factory):
    """Supervised training of a tiny U-Net for 120 iterations (about a minute on 2 cores).
    Returns (output folder, exit code, stdout, stderr); the bundle is ``output / "bundle"``."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    output = tmp_path_factory.mktemp("three-run") / "run"
    command = [sys.executable, str(root / "Training" / "train.py"), "--store", str(three_organ_store),
               "--output", str(output), "--method", "supervised", "--device", "cpu", "--progress", "json",
               f"data.cache={output.parent / 'cache'}", "network.widths=[4,8,16,32]", "network.feature_layer=3",
               "data.labeled_batch=2", "data.unlabeled_batch=2", "checkpoint_every=1000", "optim.iterations=120",
               "validation.every=60", "validation.fraction=0.2", "data.patch=[32,48,48]"]
    done = subprocess.run(command, capture_output=True, encoding="utf-8", cwd=root, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    return output, done.returncode, done.stdout, done.stderr


@pytest.fixture(scope="session")
def tiny_bundle(three_organ_run) -> Path:
    output, code, _, err = three_organ_run
    assert code == 0, err
    return output / "bundle"


@pytest.fixture(scope="module")
def mrml():
    """A fresh MRML scene (each test module has its own: the panel keeps its settings in the
    scene's parameter node) with the segmentations and colour logics set on it."""
    slicer = pytest.importorskip("slicer")
    if not hasattr(slicer, "vtkMRMLScene"):
        pytest.skip("the 'slicer' module here is not slicer-core (is PyPI's unrelated 'slicer' installed?)")
    scene = slicer.vtkMRMLScene()
    logic = slicer.vtkSlicerSegmentationsModuleLogic()
    logic.SetMRMLScene(scene)
    colours = slicer.vtkMRMLColorLogic()
    colours.SetMRMLScene(scene)
    colours.AddDefaultColorNodes()
    return scene, logic
