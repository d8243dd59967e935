"""Synthetic abdominal CT phantoms: reproducible, all 13 FLARE22 organs with plausible anatomy and overlapping
intensities, correct image types and geometry, fast enough to generate on the fly."""

from __future__ import annotations

import statistics
import time

import numpy as np
import pytest
import SimpleITK as sitk

from GuidedSegLib.labels import FLARE22_LABELS
from GuidedSegLib.phantoms import Phantom, generate_phantom

SEEDS = (0, 1, 2, 3, 4)
ORGAN = {name: value for value, name in FLARE22_LABELS.items()}


@pytest.fixture(scope="module")
def phantoms() -> dict[int, Phantom]:
    return {seed: generate_phantom(seed) for seed in SEEDS}


def arrays(phantom: Phantom) -> tuple[np.ndarray, np.ndarray]:
    return sitk.GetArrayFromImage(phantom.image), sitk.GetArrayFromImage(phantom.label)


def geometry(image: sitk.Image) -> tuple:
    return image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection()


def volumes_ml(phantom: Phantom) -> dict[str, float]:
    label = sitk.GetArrayFromImage(phantom.label)
    counts = np.bincount(label.ravel(), minlength=14)
    voxel_ml = float(np.prod(phantom.label.GetSpacing())) / 1000
    return {name: counts[value] * voxel_ml for value, name in FLARE22_LABELS.items()}


def centroid_mm(phantom: Phantom, name: str) -> np.ndarray:
    """Physical (x, y, z) centroid of an organ, LPS."""
    zyx = np.argwhere(sitk.GetArrayFromImage(phantom.label) == ORGAN[name]).mean(axis=0)
    return np.array(phantom.label.TransformContinuousIndexToPhysicalPoint(zyx[::-1].tolist()))


def test_same_seed_gives_identical_case_and_other_seeds_differ(phantoms):
    again = generate_phantom(0)
    image, label = arrays(phantoms[0])
    image_again, label_again = arrays(again)
    assert np.array_equal(image, image_again)
    assert np.array_equal(label, label_again)
    assert geometry(again.image) == geometry(phantoms[0].image)
    assert geometry(again.label) == geometry(phantoms[0].label)

    other_image, other_label = arrays(phantoms[1])
    assert image.shape != other_image.shape or not np.array_equal(image, other_image)
    assert label.shape != other_label.shape or not np.array_equal(label, other_label)


def test_image_types_and_geometry(phantoms):
    for phantom in phantoms.values():
        assert phantom.image.GetPixelID() == sitk.sitkInt16
        assert phantom.label.GetPixelID() == sitk.sitkUInt8
        assert phantom.image.GetDimension() == 3
        assert phantom.image.GetSize() == (96, 96, 64)
        assert geometry(phantom.label) == geometry(phantom.image)
        assert phantom.image.GetDirection() == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
        sx, sy, sz = phantom.image.GetSpacing()
        assert sx == sy and 3.3 <= sx <= 4.3 and 4.4 <= sz <= 6.1
        assert sz > sx  # anisotropic like a clinical abdominal CT
        # Centred on the body: the field of view holds the whole ~330 x 240 mm abdomen.
        extent = np.asarray(phantom.image.GetSize()) * np.asarray(phantom.image.GetSpacing())
        assert extent[0] >= 320 and extent[1] >= 320 and extent[2] >= 280
        image, label = arrays(phantom)
        assert set(np.unique(label)) <= set(range(14))
        assert image.min() >= -1024 and image.max() <= 3071
        assert (image[:, :, 0] < -500).all() and (image[:, 0, :] < -500).all()  # air around the body


def test_every_organ_is_present_with_sensible_relative_volumes(phantoms):
    for seed, phantom in phantoms.items():
        ml = volumes_ml(phantom)
        for name, volume in ml.items():
            assert volume > 0, f"seed {seed}: {name} missing"
        assert max(ml, key=ml.get) == "liver", (seed, ml)
        assert ml["liver"] > ml["spleen"] > ml["gallbladder"], (seed, ml)
        for kidney in ("kidney_right", "kidney_left"):
            for adrenal in ("adrenal_gland_right", "adrenal_gland_left"):
                assert ml[kidney] > ml[adrenal], (seed, ml)
        assert ml["aorta"] < ml["liver"]
        assert 700 < ml["liver"] < 3000, (seed, ml["liver"])
        # Even the smallest organs span a few tens of voxels, so they survive training-time resampling.
        counts = np.bincount(sitk.GetArrayFromImage(phantom.label).ravel(), minlength=14)
        assert counts[1:].min() >= 20, (seed, counts)


def test_left_right_and_anterior_posterior_anatomy(phantoms):
    for seed, phantom in phantoms.items():
        c = {name: centroid_mm(phantom, name) for name in ORGAN}
        # LPS: +x is patient left, +y posterior, +z superior.
        assert c["liver"][0] < c["spleen"][0], seed
        assert c["kidney_right"][0] < c["kidney_left"][0], seed
        assert c["gallbladder"][0] < 0 < c["stomach"][0], seed
        assert c["inferior_vena_cava"][0] < c["aorta"][0], seed
        assert min(c["kidney_right"][1], c["kidney_left"][1]) > c["pancreas"][1], seed
        assert c["esophagus"][2] > c["pancreas"][2], seed


def test_organ_intensities_overlap(phantoms):
    for seed, phantom in phantoms.items():
        image, label = arrays(phantom)
        iqr = {name: np.percentile(image[label == ORGAN[name]], [25, 75]) for name in ("liver", "spleen", "pancreas")}
        for a, b in (("liver", "spleen"), ("liver", "pancreas"), ("spleen", "pancreas")):
            assert iqr[a][0] <= iqr[b][1] and iqr[b][0] <= iqr[a][1], (seed, iqr)
        median = {name: float(np.median(image[label == value])) for name, value in ORGAN.items()}
        assert median["aorta"] > 80 and median["inferior_vena_cava"] > 80  # contrast-enhanced vessels
        assert median["gallbladder"] < median["liver"]


def test_generation_is_fast():
    generate_phantom(11)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        generate_phantom(12)
        times.append(time.perf_counter() - start)
    assert statistics.median(times) < 1.0, times


def test_other_size_and_spacing_sample_the_same_anatomy(phantoms):
    reference = phantoms[2]
    fine = generate_phantom(2, size=(120, 110, 40), spacing=(3.0, 3.1, 7.5))
    assert fine.image.GetSize() == (120, 110, 40)
    assert fine.image.GetSpacing() == (3.0, 3.1, 7.5)
    assert geometry(fine.label) == geometry(fine.image)
    assert fine.image.GetPixelID() == sitk.sitkInt16 and fine.label.GetPixelID() == sitk.sitkUInt8
    for name in ("kidney_left", "pancreas", "gallbladder"):  # organs inside both fields of view
        assert np.linalg.norm(centroid_mm(fine, name) - centroid_mm(reference, name)) < 5.0, name
    small = generate_phantom(2, size=(8, 9, 10))
    assert small.label.GetSize() == (8, 9, 10) and geometry(small.label) == geometry(small.image)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"size": (7, 96, 64)}, "size"),
        ({"size": (96, 96)}, "size"),
        ({"size": (96.5, 96, 64)}, "size"),
        ({"spacing": (0.0, 1.0, 1.0)}, "spacing"),
        ({"spacing": (1.0, -2.0, 1.0)}, "spacing"),
    ],
)
def test_invalid_arguments_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate_phantom(0, **kwargs)
