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
