"""The guidedseg command line as a user runs it: a phantom store, info, ingest, history, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from GuidedSegLib.cli import main
from GuidedSegLib.imageio import read_image, write_label_map
from GuidedSegLib.store import CaseStore

ROOT = Path(__file__).resolve().parents[1]


def test_phantom_store_then_info_ingest_history(tmp_path, capsys):
    store_path = tmp_path / "store"
    assert main(["phantoms", str(store_path), "--cases", "3", "--labeled", "1", "--test", "1",
                 "--size", "48", "48", "32", "--seed", "3"]) == 0
    store = CaseStore(store_path)
    assert [len(store.cases(k)) for k in ("labeled", "unlabeled", "test")] == [1, 2, 1]
    capsys.readouterr()

    assert main(["store", "info", str(store_path), "--check", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["labeled"] == 1 and info["unlabeled"] == 2 and info["problems"] == []
    assert info["annotated"]["liver"] == 1 and len(info["annotated"]) == 13

    truth = store_path / "phantomTruth" / "phantom_0001.nii.gz"
    assert main(["store", "ingest", str(store_path), "--case", "phantom_0001", "--label", str(truth),
                 "--annotated", "liver,spleen", "--source", "tester", "--model", "bundle-x"]) == 0
    assert "annotated: liver, spleen" in capsys.readouterr().out
    assert main(["store", "info", str(store_path)]) == 0
    text = capsys.readouterr().out
    assert "2 labeled" in text and " 2/2" in text and " 1/2" in text  # liver 2/2, pancreas 1/2

    assert main(["store", "history", str(store_path), "phantom_0001"]) == 0
    history = capsys.readouterr().out
    assert "source=tester" in history and "model=bundle-x" in history


def test_phantoms_are_reproducible(tmp_path):
    for name in ("a", "b"):
        assert main(["phantoms", str(tmp_path / name), "--cases", "2", "--labeled", "1", "--test", "0",
                     "--size", "40", "40", "24", "--seed", "5"]) == 0
    for sub in ("imagesTr/phantom_0000.nii.gz", "labelsTr/phantom_0000.nii.gz", "imagesUnlabeled/phantom_0001.nii.gz"):
        a, b = (sitk.GetArrayFromImage(read_image(tmp_path / n / sub)) for n in ("a", "b"))
        assert np.array_equal(a, b), sub


def test_errors_are_one_line_naming_the_file_with_exit_code_2(tmp_path):
    store_path = tmp_path / "store"
    assert main(["store", "create", str(store_path), "--labels", "1:liver,2:spleen"]) == 0
    image = sitk.Image([20, 20, 10], sitk.sitkInt16)
    sitk.WriteImage(image, str(tmp_path / "img.nii.gz"))
    bad = sitk.Image([20, 20, 10], sitk.sitkUInt8) + 7
    write_label_map(bad, tmp_path / "bad.nii.gz")
    result = subprocess.run([sys.executable, "-m", "GuidedSegLib.cli", "store", "add", str(store_path),
                             "--image", str(tmp_path / "img.nii.gz"), "--label", str(tmp_path / "bad.nii.gz")],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "bad.nii.gz: label values [7] are not in the store's label set" in lines[0]
    assert CaseStore(store_path).cases() == []


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "guidedseg"
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("guidedseg ")


# ----------------------------------------------------------------------------------------------
# segment: which outputs go where, and what is refused before anything runs


def scan(path: Path, array: np.ndarray | None = None) -> Path:
    array = np.random.default_rng(0).normal(0, 300, (16, 24, 24)).astype(np.int16) if array is None else array
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    return path


def segment_error(capsys, *args: str) -> str:
    """Run ``guidedseg segment`` expecting a refusal before the model is even read; its one line."""
    assert main(["segment", "--model", "no-model-needed", *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_segment_refuses_mismatched_files_and_folders_naming_the_right_path(tmp_path, capsys):
    scans = tmp_path / "scans"
    scans.mkdir()
    scan(scans / "a.nii.gz")
    line = segment_error(capsys, "--input", str(scans), "--output", str(tmp_path / "seg.nii.gz"))
    assert f"{tmp_path / 'seg.nii.gz'}: names a file (.nii.gz), but the input" in line and "output folder" in line
    assert not (tmp_path / "seg.nii.gz").exists()
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "readme.txt").write_text("no images here")
    line = segment_error(capsys, "--input", str(notes), "--output", str(tmp_path / "segs"))
    assert line.startswith(f"guidedseg: error: {notes}: holds no image files") and "DICOM" in line
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a.nii.gz").write_bytes(b"an earlier result")
    line = segment_error(capsys, "--input", str(scans), "--output", str(tmp_path / "out"))
    assert f"{tmp_path / 'out' / 'a.nii.gz'}: already exists" in line and "--overwrite" in line
    assert (tmp_path / "out" / "a.nii.gz").read_bytes() == b"an earlier result"
    line = segment_error(capsys, "--input", str(scans / "a.nii.gz"), "--output", str(tmp_path / "a.txt"))
    assert f"{tmp_path / 'a.txt'}: unsupported file type" in line


def test_segment_a_scan_into_a_folder_overwrite_and_input_warnings(tiny_bundle, tmp_path, capsys):
    from conftest import three_organ_phantom

    image = tmp_path / "scan.nrrd"
    sitk.WriteImage(three_organ_phantom(920)[0], str(image))
    assert main(["segment", "--model", str(tiny_bundle), "--input", str(image), "--output", f"{tmp_path / 'segdir'}/",
                 "--progress", "none"]) == 0
    written = tmp_path / "segdir" / "scan.nrrd"
    first = sitk.GetArrayFromImage(sitk.ReadImage(str(written)))
    assert (first > 0).sum() > 100 and "warning" not in capsys.readouterr().err
    written.write_bytes(b"stale")
    assert main(["segment", "--model", str(tiny_bundle), "--input", str(image), "--output", str(tmp_path / "segdir"),
                 "--overwrite", "--progress", "none"]) == 0
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(written))), first)
    assert [p.name for p in (tmp_path / "segdir").iterdir()] == ["scan.nrrd"]  # no temporary file left
    capsys.readouterr()
    # A label map given as the scan, and an image that holds one value: segmented, with a warning each.
    label = scan(tmp_path / "label.nii.gz", (first > 0).astype(np.uint8) * 2)
    flat = scan(tmp_path / "flat.nii.gz", np.full((16, 24, 24), 40, np.int16))
    for source, said in ((label, "looks like a label map, not a scan (2 whole values from 0 to 2)"),
                         (flat, "holds the one value 40 in every voxel")):
        assert main(["segment", "--model", str(tiny_bundle), "--input", str(source), "--output",
                     str(tmp_path / f"seg-{source.name}"), "--progress", "none"]) == 0
        assert f"warning: {source}: {said}" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# the smaller refusals and what the commands show


def test_history_shows_absent_organs_and_names_get_did_you_mean(tmp_path, capsys):
    store = tmp_path / "store"
    assert main(["store", "create", str(store), "--labels", "1:liver,2:spleen"]) == 0
    image, label = scan(tmp_path / "img.nii.gz"), tmp_path / "lab.nii.gz"
    mask = np.zeros((16, 24, 24), np.uint8)
    mask[4:8, 4:10, 4:10] = 1
    scan(label, mask)
    assert main(["store", "add", str(store), "--image", str(image), "--label", str(label), "--case", "c1",
                 "--annotated", "livr"]) == 2
    assert "'livr' is not an organ of the store's label set ['liver', 'spleen']; did you mean 'liver'?" in \
        capsys.readouterr().err
    assert main(["store", "add", str(store), "--image", str(image), "--label", str(label), "--case", "c1",
                 "--absent", "spleen"]) == 0
    assert main(["store", "history", str(store), "c1"]) == 0
    assert "annotated: liver  absent: spleen" in capsys.readouterr().out
    # A plain label file smaller than its image is refused (only Slicer's .seg.nrrd covers a part of the grid).
    scan(tmp_path / "small.nii.gz", mask[2:10, 2:12, 2:12])
    assert main(["store", "add", str(store), "--image", str(image), "--label", str(tmp_path / "small.nii.gz")]) == 2
    assert f"{tmp_path / 'small.nii.gz'}: does not lie on its image's grid (size [10, 10, 8] != [24, 24, 16])" in \
        capsys.readouterr().err
    assert main(["bundle", "info", str(tmp_path / "missing-folder")]) == 2
    assert f"{tmp_path / 'missing-folder'}: no such bundle folder" in capsys.readouterr().err


def test_a_closed_pipe_and_a_missing_package_end_in_one_line_not_a_traceback(tmp_path):
    store = tmp_path / "store"
    assert main(["store", "create", str(store), "--labels", "1:liver,2:spleen"]) == 0
    reader = subprocess.Popen([str(Path(sys.executable).parent / "guidedseg"), "store", "info", str(store), "--json"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    reader.stdout.close()  # as `| head` does once it has its lines
    assert reader.stderr.read() == "" and reader.wait() == 1
    # Without torch installed: one line naming the package and how to get it, from both entry points.
    image, output = str(scan(tmp_path / "img.nii.gz")), str(tmp_path / "x.nii.gz")
    segment = ["guidedseg", "segment", "--model", "m", "--input", image, "--output", output]
    train = ["train.py", "--output", str(tmp_path / "run")]
    for argv, run in ((segment, "runpy.run_module('GuidedSegLib.cli', run_name='__main__')"),
                      (train, f"runpy.run_path({str(ROOT / 'Training' / 'train.py')!r}, run_name='__main__')")):
        code = f"import sys, runpy; sys.modules['torch'] = None; sys.argv = {argv!r}; {run}"
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, result.stderr
        assert lines[0].startswith(f"{argv[0]}: error: ") and "'torch'" in lines[0] and "make setup" in lines[0]
