"""The real panel (Resources/UI/GuidedSeg.ui and GuidedSegPanel/widget.py) in a real Qt event loop:
PySide6 on Qt's offscreen platform through the PythonQt-like adapter in slicer_qt_adapter.py,
over slicer-core's real MRML scene, with the real CLI segmenting in a child process.

The scenario a user meets: choose a volume and a model, Segment, watch the progress, Cancel
(the child must be gone); Segment to the end, correct a segment, Segment again (the correction
survives in its own node), and export the corrected node with its draft deleted (nothing counts
as edited; only what the user ticks is recorded). Screenshots go to $GUIDEDSEG_SCREENSHOTS
(the README's come from here) or the test's temporary folder.
"""

from __future__ import annotations

import os
import shutil
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import vtk
from conftest import THREE_ORGANS, skip_without_qt_panel, three_organ_phantom

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "GuidedSeg"))

slicer = skip_without_qt_panel()

import slicer_qt_adapter  # noqa: E402
from PySide6 import QtCore, QtWidgets  # noqa: E402

from GuidedSegLib.store import CaseStore  # noqa: E402

UI = ROOT / "GuidedSeg" / "Resources" / "UI" / "GuidedSeg.ui"

# Slicer's Python for the panel's children: the real interpreter (so the real CLI runs), except
# that with GUIDEDSEG_TEST_STALL set a segment run reports its first stages as the CLI does and then
# stays in "Running the network", so that Cancel meets a child that is really still running.
PYTHON = """\
    import json, os, sys, time
    args = sys.argv[1:]
    if os.environ.get("GUIDEDSEG_TEST_STALL") and args[:3] == ["-m", "GuidedSegLib.cli", "segment"]:
        for i, stage in enumerate(("load", "read", "preprocess", "infer")):
            print(json.dumps({{"stage": stage, "progress": i / 8}}), flush=True)
            time.sleep(0.2)
        time.sleep(600)
        sys.exit(3)
    os.execv({python!r}, [{python!r}] + args)
"""


@pytest.fixture
def qt_panel(tmp_path, mrml, tiny_bundle):
    scene, seg_logic = mrml
    scene.Clear(0)
    adapter = slicer_qt_adapter.install(scene, seg_logic, tmp_path / "slicer-temp", tmp_path / "settings")
    from GuidedSegPanel.logic import PanelLogic
    from GuidedSegPanel.widget import PanelWidget

    python = tmp_path / "PythonSlicer"
    python.write_text(f"#!{sys.executable}\n" + textwrap.dedent(PYTHON.format(python=sys.executable)))
    python.chmod(0o755)
    models = tmp_path / "models"
    shutil.copytree(tiny_bundle, models / "three-organs")
    work = tmp_path / "slicer-temp"
    work.mkdir()
    panel = PanelWidget(str(UI), logic=PanelLogic(scene, seg_logic, python=str(python), work_root=work))
    panel.widget.resize(480, 980)
    panel.widget.show()
    try:
        yield panel, adapter, models, work
    finally:
        adapter.close_panel(panel)


def screenshots(tmp_path) -> Path:
    return Path(os.environ.get("GUIDEDSEG_SCREENSHOTS") or tmp_path / "screenshots")


def paint_liver(logic, node, volume, mask):
    """What a Segment Editor correction leaves: the liver segment now holds exactly ``mask``."""
    scene = logic.scene
    segment = node.GetSegmentation().GetSegmentIdBySegmentName("liver")
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    labelmap.CopyOrientation(volume)
    slicer.util.updateVolumeFromArray(labelmap, mask.astype(np.uint8))
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segment)
    assert logic.segmentations_logic.ImportLabelmapToSegmentationNode(labelmap, node, ids)
    scene.RemoveNode(labelmap)


def liver_mask(logic, node, volume):
    from GuidedSegPanel import nodes

    segment = node.GetSegmentation().GetSegmentIdBySegmentName("liver")
    return nodes.segment_mask(node, segment, volume, logic.segmentations_logic, logic.scene)


def test_the_real_panel_segments_cancels_keeps_corrections_and_exports_only_what_was_reviewed(
        qt_panel, tmp_path, monkeypatch):
    panel, adapter, models, work = qt_panel
    ui, logic = panel.ui, panel.logic
    from GuidedSegPanel import nodes

    image, _ = three_organ_phantom(800)
    volume = nodes.image_to_volume(image, logic.scene, "abdomen phantom")
    store = CaseStore.create(tmp_path / "store", THREE_ORGANS)
    shots = screenshots(tmp_path)

    # choose the models folder, the store, the volume and the model as a user does
    ui.modelsFolderPathLineEdit.currentPath = str(models)
    ui.storePathLineEdit.currentPath = str(store.root)
    adapter.process(0.1)
    ui.inputVolumeSelector.setCurrentIndex(ui.inputVolumeSelector.findText("abdomen phantom"))
    ui.modelComboBox.setCurrentIndex(0)
    adapter.wait_until(lambda: not logic.running("devices"), 120, "the device probe")
    adapter.process(0.2)
    assert logic.parameters.input_volume is volume and logic.selected_model().name == ui.modelComboBox.currentText.split(" (")[0]
    assert ui.segmentButton.enabled and ui.segmentButton.text == "Segment"
    assert ui.deviceComboBox.count >= 1 and not ui.messageLabel.visible, ui.messageLabel.text

    # Segment, watch the progress advance, Cancel: the child process is gone and nothing is left
    progress = []
    ui.segmentProgressBar.connect("valueChanged(int)", progress.append)
    monkeypatch.setenv("GUIDEDSEG_TEST_STALL", "1")
    adapter.click(ui.segmentButton)
    adapter.wait_until(lambda: ui.segmentStatusLabel.text == "Running the network", 60, "the network stage")
    assert ui.segmentButton.text == "Cancel" and ui.segmentProgressBar.visible and not ui.inputVolumeSelector.enabled
    assert len(set(progress)) >= 3 and progress == sorted(progress), progress
    pid = logic.jobs["segment"].process.pid
    adapter.click(ui.segmentButton)
    adapter.wait_until(lambda: ui.segmentStatusLabel.text == "Cancelled.", 10, "Cancel")
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # neither the child nor anything it started is left
    assert list(work.iterdir()) == [] and logic.parameters.segmentation is None
    assert ui.segmentButton.text == "Segment" and not ui.segmentProgressBar.visible
    monkeypatch.delenv("GUIDEDSEG_TEST_STALL")

    # Segment to the end with the real CLI
    progress.clear()
    adapter.click(ui.segmentButton)
    adapter.wait_until(lambda: ui.segmentStatusLabel.text.startswith(("Done in ", "Segmentation failed")), 300, "Segment")
    assert ui.segmentStatusLabel.text.startswith("Done in "), (ui.segmentStatusLabel.text, adapter.messages)
    assert any(0 < v < 100 for v in progress) and progress == sorted(progress), progress
    first = logic.parameters.segmentation
    assert ui.segmentationSelector.currentNode() is first
    assert sorted(name for _, name in nodes.segments(first)) == sorted(THREE_ORGANS.values())
    assert nodes.draft_node(first) is not None and list(work.iterdir()) == []
    assert ui.correctButton.enabled and ui.exportButton.enabled
    adapter.screenshot(panel.widget, shots / "panel-segmented.png")
    adapter.click(ui.show3DButton)  # surfaces for the 3D view, and off again
    assert ui.show3DButton.checked and first.GetSegmentation().ContainsRepresentation("Closed surface")
    adapter.click(ui.show3DButton)
    assert not first.GetSegmentation().ContainsRepresentation("Closed surface")

    # correct the liver, then Segment again: a new node; the correction is still there
    corrected = liver_mask(logic, first, volume).copy()
    assert corrected.sum() > 50
    slices = np.flatnonzero(corrected.any(axis=(1, 2)))
    corrected[slices[0]: slices[0] + len(slices) // 2] = False  # the liver's upper half was a leak
    paint_liver(logic, first, volume, corrected)
    adapter.click(ui.segmentButton)
    adapter.wait_until(lambda: logic.parameters.segmentation is not first and not logic.running("segment"), 300,
                       "the second Segment")
    second = logic.parameters.segmentation
    assert second is not None and second.GetID() != first.GetID(), adapter.messages
    assert first.GetScene() is logic.scene and np.array_equal(liver_mask(logic, first, volume), corrected)
    assert not any(kind == "confirm" for kind, _ in adapter.messages)  # nothing was replaced, nothing asked
    third_draft = nodes.draft_node(second)
    logic.scene.RemoveNode(second)  # the user deletes the newer segmentation: its hidden draft goes too
    adapter.process(0.1)
    assert third_draft.GetScene() is None and nodes.draft_node(first).GetScene() is logic.scene

    # choose the corrected node; its draft is deleted: replacing it asks, and No keeps it
    ui.segmentationSelector.setCurrentIndex(ui.segmentationSelector.findText(first.GetName()))
    assert logic.parameters.segmentation is first
    logic.scene.RemoveNode(nodes.draft_node(first))
    ui.replaceSegmentationCheckBox.checked = True
    adapter.answers.append(False)
    adapter.click(ui.segmentButton)
    adapter.process(0.1)
    assert adapter.messages[-1][0] == "confirm" and first.GetName() in adapter.messages[-1][1]
    assert not logic.running("segment") and ui.segmentStatusLabel.text == "Not started: the corrections are kept."
    ui.replaceSegmentationCheckBox.checked = False

    # open Export: with no draft nothing is ticked or locked; the user ticks the liver they reviewed
    seen = {}

    def tick_liver(dialog):
        boxes = {QtWidgets.QAbstractButton.text(b).split(" (")[0]: b for b in dialog.findChildren(QtWidgets.QCheckBox)}
        seen["boxes"] = {n: (b.isChecked(), b.isEnabled()) for n, b in boxes.items()}
        boxes["liver"].setChecked(True)
        adapter.process(0.05)
        seen["summary"] = "\n".join(QtWidgets.QLabel.text(label) for label in dialog.findChildren(QtWidgets.QLabel))
        adapter.screenshot(dialog, shots / "export-dialog.png")

    adapter.in_dialog(ui.exportButton, tick_liver, "Export")
    assert seen.get("boxes") == {name: (False, True) for name in THREE_ORGANS.values()}, seen
    assert "No model draft found" in seen["summary"] and "Counted as annotated: liver (checked)" in seen["summary"]
    assert ui.segmentStatusLabel.text.startswith("Stored label version 1 of case abdomen_phantom"), \
        (ui.segmentStatusLabel.text, adapter.messages)
    case = CaseStore(store.root).case("abdomen_phantom")
    assert case.annotated == (1,) and case.absent == ()
    stored = sitk.GetArrayFromImage(sitk.ReadImage(str(case.label)))
    assert np.array_equal(stored == 1, corrected) and set(np.unique(stored)) <= {0, 1}
    adapter.screenshot(panel.widget, shots / "panel-exported.png")


def test_a_first_time_user_is_led_to_a_model_and_installs_in_one_action(qt_panel, tmp_path, monkeypatch):
    panel, adapter, models, _ = qt_panel
    ui, logic = panel.ui, panel.logic
    shots = screenshots(tmp_path)
    adapter.wait_until(lambda: not logic.running("devices"), 120, "the device probe")
    adapter.process(0.1)

    # no model and no models folder: the panel says how to get one
    assert ui.messageLabel.visible and ui.messageLabel.text.startswith("No model yet. Import a model bundle")
    assert ui.starterModelButton.visible and ui.importModelButton.enabled and not ui.segmentButton.enabled
    assert ui.environmentLabel.text.startswith("PyTorch ") and \
        ui.environmentLabel.text.endswith(f"Segment runs on: {logic.device_name()}")
    adapter.screenshot(panel.widget, shots / "panel-first-use.png")

    # the one-click starter model: train.py on fresh phantoms in the background (stopped here at once)
    adapter.answers.append(True)
    adapter.click(ui.starterModelButton)
    job = logic.jobs.get("train")
    assert job is not None and "--store" not in job.argv, adapter.messages
    assert ui.trainProgressBar.visible and not ui.trainCollapsibleButton.collapsed and not ui.starterModelButton.visible
    assert ui.trainButton.text == "Cancel training"
    adapter.click(ui.trainButton)
    adapter.wait_until(lambda: ui.trainStatusLabel.text.startswith("Stopped"), 30, "stopping the starter training")
    assert not job.output.exists() and ui.starterModelButton.visible  # nothing half-trained is left

    # Import: the user picks a bundle's model.json; with no models folder chosen it goes to the default one
    qt = sys.modules["qt"]
    chosen = str(models / "three-organs" / "model.json")
    monkeypatch.setattr(qt.QFileDialog, "getOpenFileName", staticmethod(lambda *args, **kwargs: (chosen, "")))
    adapter.click(ui.importModelButton)
    adapter.process(0.1)
    default = tmp_path / "settings" / "slicer.org" / "GuidedSeg" / "models"
    assert ui.modelsFolderPathLineEdit.currentPath == str(default), adapter.messages
    assert (default / "three-organs" / "weights.safetensors").is_file() and ui.modelComboBox.count == 1
    assert logic.selected_model().path == default / "three-organs" and not ui.starterModelButton.visible
    assert ui.segmentStatusLabel.text.startswith(f"Imported {logic.selected_model().name} into ...")
    assert ui.segmentStatusLabel.text.endswith("/GuidedSeg/models.")  # elided: a long path must not widen the panel
    assert panel.widget.sizeHint.width() <= 520, panel.widget.sizeHint  # (a property, as in PythonQt)

    # PyTorch and MONAI missing: one click, one question (which build), torch in one call, the rest in one
    logic.find_spec = lambda name: None if name in ("torch", "monai") else object()
    panel.update_gui()
    assert ui.installButton.visible and "lacks torch, monai" in ui.messageLabel.text and ui.environmentLabel.text == ""
    pip, seen = [], {}
    monkeypatch.setattr(slicer.util, "pip_install", pip.append)
    adapter.messages.clear()

    def choose_cpu():
        box = adapter.qapp.activeModalWidget()
        try:
            seen["buttons"] = [QtWidgets.QAbstractButton.text(b) for b in box.buttons()]
            seen["text"] = QtWidgets.QMessageBox.text(box)
            adapter.click([b for b in box.buttons() if QtWidgets.QAbstractButton.text(b) == "CPU only"][0])
        finally:
            if box is not None and box.isVisible():
                box.reject()

    QtCore.QTimer.singleShot(200, choose_cpu)
    adapter.click(ui.installButton)
    assert {"NVIDIA GPU (CUDA)", "CPU only"} <= set(seen.get("buttons", [])), seen
    assert "torch, monai" in seen["text"]
    assert pip == ["torch>=2.2 --index-url https://download.pytorch.org/whl/cpu", "monai>=1.3"]
    assert not [m for m in adapter.messages if m[0] in ("confirm", "error")], adapter.messages
