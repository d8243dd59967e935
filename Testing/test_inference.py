"""Inference with a bundle trained in the session (conftest ``tiny_bundle``): label maps on the
scan's exact grid, MONAI parity, the ``segment`` command (files, folders, progress, SIGTERM),
``bundle info``, and refusals that name the problem and write nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import rotation, three_organ_phantom

from GuidedSegLib.bundle import BUNDLE_FORMAT, BundleError, load_networks
from GuidedSegLib.cli import main
from GuidedSegLib.geometry import Grid
from GuidedSegLib.inference import Predictor, body_box, count_windows, keep_largest_components
from GuidedSegLib.metrics import dice

ROOT = Path(__file__).resolve().parents[1]


def test_segments_a_phantom_onto_its_exact_grid(tiny_bundle):
    image, truth = three_organ_phantom(900)  # not a training case
    label = Predictor(tiny_bundle).segment(image)
    assert Grid.of(label) == Grid.of(image)
    out, ref = sitk.GetArrayFromImage(label), sitk.GetArrayFromImage(truth)
    print("liver Dice on an unseen phantom:", dice(out == 1, ref == 1))
    assert dice(out == 1, ref == 1) > 0.7


def moved(image: sitk.Image, spacing, angles) -> sitk.Image:
    """The same voxels placed on an oblique grid with other spacing (the anatomy moves with it)."""
    out = sitk.Image(image)
    out.SetSpacing(spacing)
    out.SetDirection(rotation(*angles).flatten().tolist())
    out.SetOrigin((-101.5, 37.25, 512.125))
    return out


@pytest.mark.parametrize("spacing, angles, floor", [
    ((7.5, 8.5, 10.5), (8.0, -6.0, 12.0), 0.6),   # oblique, slightly other spacing
    ((8.0, 8.0, 40.0), (0.0, 0.0, 0.0), None),    # very anisotropic: only geometry is checked
])
def test_oblique_and_anisotropic_scans_come_back_on_their_grid(tiny_bundle, spacing, angles, floor):
    image, truth = three_organ_phantom(901)
    image, truth = moved(image, spacing, angles), moved(truth, spacing, angles)
    label = Predictor(tiny_bundle).segment(image)
    assert Grid.of(label) == Grid.of(image)
    if floor is not None:
        score = dice(sitk.GetArrayViewFromImage(label) == 1, sitk.GetArrayViewFromImage(truth) == 1)
        assert score > floor, score


def test_a_scan_smaller_than_one_window(tiny_bundle):
    image, _ = three_organ_phantom(902)
    small = image[10:22, 12:20, 8:13]  # 12 x 8 x 5 voxels; the window is 48 x 48 x 32
    label = Predictor(tiny_bundle).segment(small)
    assert Grid.of(label) == Grid.of(small)


def test_same_result_as_plain_monai_sliding_window(tiny_bundle):
    """Body box, float16 stitching and slab-wise restoring change almost nothing against MONAI's
    sliding_window_inference in float32 over the whole preprocessed volume."""
    from monai.inferers import sliding_window_inference

    from GuidedSegLib.preprocessing import preprocess

    predictor = Predictor(tiny_bundle)
    image, _ = three_organ_phantom(903)
    volume = sitk.GetArrayFromImage(preprocess(image, predictor.plan).image)
    ours = predictor.probabilities(volume).argmax(0)
    network = predictor.networks[0]
    with torch.no_grad():
        plain = sliding_window_inference(torch.from_numpy(volume)[None, None], predictor.patch, 1,
                                         lambda x: network(x)[0], overlap=predictor.overlap, mode="gaussian")
    agreement = float((plain[0].argmax(0).numpy() == ours).mean())
    assert agreement > 0.995, agreement


def test_body_box_skips_the_air_and_window_count_matches_monai():
    volume = np.zeros((40, 100, 120), np.float32)
    volume[5:35, 30:70, 20:90] = 1.0
    box = body_box(volume, (16, 32, 32), margin=2)
    assert box == (slice(3, 37), slice(28, 72), slice(18, 92))
    assert body_box(volume, (64, 160, 160)) == (slice(0, 40), slice(0, 100), slice(0, 120))
    from monai.data.utils import dense_patch_slices

    for shape in ((40, 100, 120), (16, 20, 33), (70, 161, 159)):
        assert count_windows(shape, (16, 32, 32), (8, 16, 16)) == len(dense_patch_slices(
            tuple(max(s, p) for s, p in zip(shape, (16, 32, 32))), (16, 32, 32), (8, 16, 16)))


def test_largest_component_keeps_the_organ_and_drops_islands():
    indices = np.zeros((20, 20, 20), np.uint8)
    indices[2:10, 2:10, 2:10] = 1
    indices[15:17, 15:17, 15:17] = 1  # island of organ 1
    indices[12:18, 2:6, 2:6] = 2
    keep_largest_components(indices)
    assert (indices == 1).sum() == 512 and indices[16, 16, 16] == 0 and (indices == 2).sum() == 96


# ----------------------------------------------------------------------------------------------
# the segment command


def segment_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "GuidedSegLib.cli", "segment", *args]


def test_file_and_folder_give_identical_output_and_json_progress(tiny_bundle, tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    for i in range(2):
        sitk.WriteImage(three_organ_phantom(910 + i)[0], str(scans / f"scan_{i}.nii.gz"))
    one = subprocess.run(segment_command("--model", str(tiny_bundle), "--input", str(scans / "scan_1.nii.gz"),
                                         "--output", str(tmp_path / "one.nii.gz")), capture_output=True, encoding="utf-8")
    assert one.returncode == 0, one.stderr
    many = subprocess.run(segment_command("--model", str(tiny_bundle), "--input", str(scans), "--output",
                                          str(tmp_path / "out"), "--progress", "json"), capture_output=True, encoding="utf-8")
    assert many.returncode == 0, many.stderr
    a = sitk.ReadImage(str(tmp_path / "one.nii.gz"))
    b = sitk.ReadImage(str(tmp_path / "out" / "scan_1.nii.gz"))
    assert Grid.of(a) == Grid.of(b)
    assert np.array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
    events = [json.loads(line) for line in many.stdout.splitlines()]
    assert events[-1]["stage"] == "done" and len(events[-1]["outputs"]) == 2
    progress = [e["progress"] for e in events if "progress" in e]
    assert progress == sorted(progress) and progress[-1] == 1.0
    assert {"preprocess", "infer", "restore", "write"} <= {e["stage"] for e in events}
    # A second run refuses to overwrite anything and says which file is in the way.
    again = subprocess.run(segment_command("--model", str(tiny_bundle), "--input", str(scans), "--output",
                                           str(tmp_path / "out")), capture_output=True, encoding="utf-8")
    assert again.returncode == 2 and "scan_0.nii.gz: already exists and 1 more" in again.stderr


def test_sigterm_stops_within_a_second_and_leaves_no_output(tiny_bundle, tmp_path):
    big = sitk.Image([400, 400, 160], sitk.sitkInt16)  # large enough to run for several seconds
    big.SetSpacing((1.0, 1.0, 2.0))
    body = np.full((160, 400, 400), -1000, np.int16)
    body[10:150, 50:350, 40:360] = 40
    big = sitk.GetImageFromArray(body)
    big.SetSpacing((1.0, 1.0, 2.0))
    source = tmp_path / "big.nii.gz"
    sitk.WriteImage(big, str(source))
    out = tmp_path / "out"
    process = subprocess.Popen(segment_command("--model", str(tiny_bundle), "--input", str(source), "--output",
                                               str(out / "big.nii.gz"), "--progress", "json"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, encoding="utf-8")
    for line in process.stdout:
        if json.loads(line)["stage"] in ("infer", "restore"):
            break
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    code = process.wait(timeout=10)
    assert time.monotonic() - sent < 1.0
    assert code == 128 + signal.SIGTERM
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())


# ----------------------------------------------------------------------------------------------
# refusals: a clear message, exit code 2, nothing written


def write_raw(path: Path, array: np.ndarray) -> Path:
    sitk.WriteImage(sitk.GetImageFromArray(array, isVector=False), str(path))
    return path


def bad_inputs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    flat = write_raw(tmp_path / "flat.nii.gz", np.zeros((40, 40), np.int16))
    four = tmp_path / "four.nii.gz"
    sitk.WriteImage(sitk.JoinSeries([sitk.GetImageFromArray(np.zeros((8, 8, 8), np.int16))] * 3), str(four))
    nan = np.zeros((8, 16, 16), np.float32)
    nan[3, 4, 5] = np.nan
    nans = write_raw(tmp_path / "nan.mha", nan)  # ITK reads NaN in NIfTI as 0, so MetaImage
    whole = write_raw(tmp_path / "whole.nii", np.zeros((16, 32, 32), np.int16))
    truncated = tmp_path / "truncated.nii"
    truncated.write_bytes(whole.read_bytes()[:-5000])
    return {"2D": (flat, "2D"), "4D": (four, "4D"), "NaN": (nans, "NaN"), "truncated": (truncated, "truncated")}


def test_bad_scans_are_refused_by_name(tiny_bundle, tmp_path, capsys):
    for what, (path, word) in bad_inputs(tmp_path).items():
        out = tmp_path / f"out-{what}.nii.gz"
        assert main(["segment", "--model", str(tiny_bundle), "--input", str(path), "--output", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert str(path) in err and word.lower() in err.lower(), err
        assert not out.exists()


def copy_bundle(bundle: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(bundle, target)
    return target


def test_bundle_with_a_pickle_instead_of_tensors_is_refused(tiny_bundle, tmp_path, capsys):
    bundle = copy_bundle(tiny_bundle, tmp_path / "pickled")

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    import pickle

    (bundle / "weights.safetensors").write_bytes(pickle.dumps({"A.head.weight": Payload()}))
    image = tmp_path / "scan.nii.gz"
    sitk.WriteImage(three_organ_phantom(920)[0], str(image))
    assert main(["segment", "--model", str(bundle), "--input", str(image), "--output", str(tmp_path / "o.nii.gz")]) == 2
    err = capsys.readouterr().err
    assert "weights.safetensors: cannot be read as safetensors weights (tensors only)" in err
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "o.nii.gz").exists()


def test_bundle_whose_labels_do_not_match_its_head_is_refused(tiny_bundle, tmp_path):
    bundle = copy_bundle(tiny_bundle, tmp_path / "mismatch")
    metadata = json.loads((bundle / "model.json").read_text())
    metadata["labels"]["4"] = "pancreas"
    (bundle / "model.json").write_text(json.dumps(metadata))
    with pytest.raises(BundleError, match="4 outputs") as error:
        load_networks(bundle)
    assert "5 labels" in str(error.value) and str(bundle) in str(error.value)


def test_bundle_of_a_newer_format_is_refused_and_info_describes_a_bundle(tiny_bundle, tmp_path, capsys):
    assert main(["bundle", "info", str(tiny_bundle)]) == 0
    shown = capsys.readouterr().out
    assert "supervised" in shown and "liver" in shown and "kidney" in shown and "validation mean Dice" in shown
    bundle = copy_bundle(tiny_bundle, tmp_path / "newer")
    metadata = json.loads((bundle / "model.json").read_text())
    metadata["format"] = BUNDLE_FORMAT + 1
    (bundle / "model.json").write_text(json.dumps(metadata))
    assert main(["bundle", "info", str(bundle)]) == 2
    assert "newer than this GuidedSeg reads" in capsys.readouterr().err
