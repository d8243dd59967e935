"""End to end through the real CLI: the panel logic segments a phantom with a tiny bundle in a child
process and gets a segmentation named after the bundle; a broken bundle reads as one line.
Skipped until ``guidedseg segment`` speaks the progress protocol (``--progress json``)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import run_until_finished

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "GuidedSeg"))

slicer = pytest.importorskip("slicer")
pytest.importorskip("torch")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the 'slicer' module here is not slicer-core", allow_module_level=True)

from GuidedSegPanel import commands, nodes
from GuidedSegPanel.logic import PanelLogic
from GuidedSegPanel.selftest import write_tiny_bundle

from GuidedSegLib.labels import FLARE22_LABELS
from GuidedSegLib.phantoms import generate_phantom


def _cli_speaks_progress() -> bool:
    done = subprocess.run([sys.executable, "-m", "GuidedSegLib.cli", "segment", "--help"], capture_output=True,
                          text=True, env=commands.child_environment(), timeout=120, check=False)
    return "--progress" in done.stdout


pytestmark = pytest.mark.skipif(not _cli_speaks_progress(), reason="guidedseg segment has no --progress yet")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, mrml):
    tmp = tmp_path_factory.mktemp("e2e")
    models = tmp / "models"
    models.mkdir()
    write_tiny_bundle(models / "tiny", FLARE22_LABELS)
    scene, seg_logic = mrml
    work = tmp / "work"
    work.mkdir()
    logic = PanelLogic(scene, seg_logic, python=sys.executable, work_root=work)
    logic.set_models_folder(models)
    phantom = generate_phantom(3, size=(40, 40, 24))
    volume = nodes.image_to_volume(phantom.image, scene, "phantom")
    logic.parameters.input_volume = volume
    return logic, tmp


def test_segment_with_the_real_cli_gives_the_bundles_segments(setup):
    logic, _ = setup
    logic.parameters.model = str(Path(logic.models_folder) / "tiny")
    job = logic.start_segment()
    updates = run_until_finished(logic, "segment", timeout=240)
    final = updates[-1]
    assert final.ok, final.error
    stages = [u.text for u in updates if u.text and not u.finished]
    assert stages and stages[0] == "Loading the model"
    node = final.result
    names = sorted(name for _, name in nodes.segments(node))
    assert names == sorted(FLARE22_LABELS.values())
    assert not job.folder.exists()  # the draft lives in the scene, not in the temporary folder
    draft = nodes.draft_node(node)
    assert draft is not None and draft.GetHideFromEditors()
    assert node.GetAttribute(nodes.MODEL_NAME_ATTRIBUTE) == "tiny-selftest"
    volume = logic.parameters.input_volume
    total = sum(int(np.count_nonzero(nodes.segment_mask(node, sid, volume, logic.segmentations_logic, logic.scene)))
                for sid, _ in nodes.segments(node))
    assert total <= int(np.prod(slicer.util.arrayFromVolume(volume).shape))


def test_a_broken_bundle_reads_as_one_line_naming_it(setup):
    logic, tmp = setup
    broken = Path(logic.models_folder) / "broken"
    shutil.copytree(Path(logic.models_folder) / "tiny", broken)
    (broken / "weights.safetensors").write_bytes(b"not weights")
    logic.refresh_models()
    logic.parameters.model = str(broken)
    logic.start_segment()
    final = run_until_finished(logic, "segment", timeout=240)[-1]
    assert not final.ok
    assert final.error.startswith("guidedseg: error: ") and "broken" in final.error and "\n" not in final.error
    assert not list((tmp / "work").glob("segment-*"))  # a failed run leaves nothing behind either
