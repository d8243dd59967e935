"""The module's own self-test (GuidedSegTest in GuidedSeg.py, what Slicer's "Reload and Test" and
ctest run) on slicer-core's MRML: without PyTorch it still tests the export for real, and the
PyTorch part reports "skipped", never "passed"."""

from __future__ import annotations

import importlib.util
import sys
import types
import unittest
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "GuidedSeg"))

slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the 'slicer' module here is not slicer-core", allow_module_level=True)


@pytest.fixture
def selftest(mrml, tmp_path, monkeypatch):
    """GuidedSeg.py loaded with Slicer's ScriptedLoadableModule base classes stood in for, and the
    application's scene, temporary folder and segmentations logic given to slicer."""
    scene, seg_logic = mrml
    shown = []

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, msec=1000):
            shown.append(message)

    base = types.ModuleType("slicer.ScriptedLoadableModule")
    base.ScriptedLoadableModuleTest = ScriptedLoadableModuleTest
    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleLogic", "ScriptedLoadableModuleWidget"):
        setattr(base, name, type(name, (), {}))
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", base)
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(temporaryPath=str(tmp_path)), raising=False)
    volumes = slicer.vtkSlicerVolumesLogic()
    volumes.SetMRMLScene(scene)
    monkeypatch.setattr(slicer, "modules", types.SimpleNamespace(
        segmentations=types.SimpleNamespace(logic=lambda: seg_logic),
        volumes=types.SimpleNamespace(logic=lambda: volumes)), raising=False)
    spec = importlib.util.spec_from_file_location("GuidedSeg_under_test", ROOT / "GuidedSeg" / "GuidedSeg.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.GuidedSegTest, shown


def run(case) -> unittest.TestResult:
    result = unittest.TestResult()
    case.run(result)
    return result


def test_the_self_test_checks_the_export_without_pytorch(selftest, tmp_path):
    GuidedSegTest, shown = selftest
    result = run(GuidedSegTest("test_export_records_what_was_edited"))
    assert result.wasSuccessful(), result.errors + result.failures
    assert shown[-1] == "Export test passed"
    assert list(tmp_path.glob("GuidedSegSelfTest-*/store/labelsTr/*"))  # it really wrote a labeled case


def test_the_pytorch_part_reports_skipped_without_pytorch(selftest, monkeypatch):
    GuidedSegTest, shown = selftest
    from GuidedSegPanel import install

    monkeypatch.setattr(install, "missing", lambda *a: [install.REQUIREMENTS[0], install.REQUIREMENTS[1]])
    result = run(GuidedSegTest("test_segment_correct_export"))
    assert not result.errors and not result.failures and result.testsRun == 1
    assert len(result.skipped) == 1 and "lacks torch, monai" in result.skipped[0][1]
    shown.clear()
    GuidedSegTest("runTest").runTest()  # what "Reload and Test" calls: says so, instead of "passed"
    assert shown[-1].startswith("test_segment_correct_export skipped: Slicer's Python lacks torch, monai")
    assert "Test passed" not in shown
