"""The annotation loop in the real panel (the .ui and widget.py in a real Qt event loop, PySide6
offscreen through slicer_qt_adapter.py, over slicer-core's MRML scene), with the real CLI and
train.py as its child processes: Rank the unlabeled cases, Next case (its draft, only the organs
chosen), Skip (down the queue, not out), Export, an automatic fine-tune after it whose Dice shows
beside its parent's, back to the parent, Fine-tune with Cancel, Re-open a labeled case, and the
empty queue said clearly."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
from conftest import skip_without_qt_panel, three_organ_phantom

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "GuidedSeg"))

slicer = skip_without_qt_panel()

import slicer_qt_adapter  # noqa: E402
from PySide6 import QtWidgets  # noqa: E402

from GuidedSegLib.store import CaseStore  # noqa: E402

UI = ROOT / "GuidedSeg" / "Resources" / "UI" / "GuidedSeg.ui"


@pytest.fixture
def loop_panel(tmp_path, mrml, tiny_bundle, three_organ_store):
    scene, seg_logic = mrml
    scene.Clear(0)
    adapter = slicer_qt_adapter.install(scene, seg_logic, tmp_path / "slicer-temp", tmp_path / "settings")
    from GuidedSegPanel.logic import PanelLogic
    from GuidedSegPanel.widget import PanelWidget

    models = tmp_path / "models"
    shutil.copytree(tiny_bundle, models / "three-organs")
    store = tmp_path / "store"
    shutil.copytree(three_organ_store, store)
    work = tmp_path / "slicer-temp"
    work.mkdir()
    logic = PanelLogic(scene, seg_logic, python=sys.executable, work_root=work)
    logic.fine_tune_settings = ("optim.iterations=4", "validation.every=2")  # seconds, not minutes
    panel = PanelWidget(str(UI), logic=logic)
    panel.widget.resize(480, 1100)
    panel.widget.show()
    try:
        yield panel, adapter, models, store
    finally:
        adapter.close_panel(panel)


def export_all(adapter, ui):
    """Click Export; in the dialog tick every organ as checked and click Export."""
    def tick_all(dialog):
        for box in dialog.findChildren(QtWidgets.QCheckBox):
            if box.isEnabled():
                box.setChecked(True)

    adapter.in_dialog(ui.exportButton, tick_all, "Export")


def test_the_loop_ranks_loads_skips_exports_fine_tunes_switches_back_and_reopens(loop_panel):
    panel, adapter, models, store_root = loop_panel
    ui, logic = panel.ui, panel.logic
    from GuidedSegPanel import nodes

    ui.modelsFolderPathLineEdit.currentPath = str(models)
    ui.storePathLineEdit.currentPath = str(store_root)
    ui.modelComboBox.setCurrentIndex(0)
    adapter.wait_until(lambda: not logic.running("devices"), 120, "the device probe")
    adapter.process(0.2)
    parent = logic.selected_model()
    assert ui.queueLabel.text == "2 unlabeled case(s) in the queue." and ui.rankButton.enabled
    assert ui.autoFineTuneSpinBox.value == 0  # off by default

    # Rank with the real CLI
    adapter.click(ui.rankButton)
    adapter.wait_until(lambda: not logic.running("suggest"), 180, "the ranking")
    adapter.process(0.1)
    assert ui.queueLabel.text.startswith("2 unlabeled case(s) in the queue.\nRanked 2 unlabeled case(s); next: "), \
        (ui.queueLabel.text, adapter.messages)
    first = ui.queueLabel.text.split("next: ")[1].split(". ")[0]
    assert logic.queue()[0] == first

    # Next case, segmenting only two organs: the top-ranked image, with its draft
    ui.organsLineEdit.text = "liver, spleen"
    ui.organsLineEdit.editingFinished.emit()
    adapter.click(ui.nextCaseButton)
    adapter.wait_until(lambda: not logic.running("segment"), 180, "the draft of the first case")
    volume, draft = logic.parameters.input_volume, logic.parameters.segmentation
    assert volume.GetAttribute(nodes.CASE_ATTRIBUTE) == first and draft is not None, adapter.messages
    assert sorted(name for _, name in nodes.segments(draft)) == ["liver", "spleen"]
    assert ui.queueLabel.text == f"Current case: {first}. 2 unlabeled case(s) in the queue."

    # Skip: it drops down the queue (not out) and the next case loads
    adapter.click(ui.skipButton)
    adapter.wait_until(lambda: not logic.running("segment"), 180, "the draft of the second case")
    second = logic.parameters.current_case
    assert second != first and logic.queue() == [second, first]

    # Export it, with an automatic fine-tune after every new labeled case
    ui.autoFineTuneSpinBox.value = 1
    assert logic.parameters.auto_fine_tune_every == 1
    export_all(adapter, ui)
    assert ui.segmentStatusLabel.text.startswith(f"Stored label version 1 of case {second}"), \
        (ui.segmentStatusLabel.text, adapter.messages)
    assert logic.queue() == [first] and CaseStore(store_root).case(second).kind == "labeled"
    assert logic.running("finetune") and ui.fineTuneButton.text == "Cancel fine-tune"
    adapter.wait_until(lambda: not logic.running("finetune"), 300, "the automatic fine-tune")
    assert ui.fineTuneStatusLabel.text.startswith("Done in "), (ui.fineTuneStatusLabel.text, adapter.messages)
    new = logic.selected_model()
    assert new.path != parent.path and new.parent == str(parent.path) and parent.path.is_dir()
    assert new.name.endswith("-v2") and new.name != parent.name  # versions tell apart in the model list
    assert new.path.parent.name.endswith("-ft1")  # the run folder is named as train.py --init-from names it
    assert ui.comparisonLabel.text.startswith(f"New model {new.name}: validation mean Dice {new.mean_dice:.3f} "
                                              f"(parent {parent.name}: {parent.mean_dice:.3f})"), ui.comparisonLabel.text
    assert ui.modelComboBox.count == 2  # both versions are listed

    # back to the parent version, and forth
    assert ui.parentModelButton.enabled
    adapter.click(ui.parentModelButton)
    assert logic.selected_model().path == parent.path and not ui.parentModelButton.enabled
    ui.modelComboBox.setCurrentIndex(ui.modelComboBox.findData(str(new.path)))
    assert logic.selected_model().path == new.path

    # Fine-tune by hand, then Cancel: nothing new is listed
    ui.autoFineTuneSpinBox.value = 0
    adapter.click(ui.fineTuneButton)
    assert logic.running("finetune")
    adapter.click(ui.fineTuneButton)
    adapter.wait_until(lambda: not logic.running("finetune"), 60, "cancelling the fine-tune")
    assert ui.fineTuneStatusLabel.text == "Stopped; no new model was written."
    logic.refresh_models()
    assert len(logic.models) == 2

    # Re-open the exported case with its latest label version
    ui.reopenComboBox.setCurrentIndex(ui.reopenComboBox.findText(second))
    adapter.click(ui.reopenButton)
    node = logic.parameters.segmentation
    assert node.GetName().startswith(f"{second} label v1") and nodes.draft_node(node) is not None
    assert logic.parameters.current_case == second

    # the last unlabeled case labeled elsewhere: the queue says it is empty, Next case is off
    CaseStore(store_root).ingest_label(first, three_organ_phantom(704 if first == "case_4" else 705)[1])
    panel.update_gui()
    assert ui.queueLabel.text.endswith("The queue is empty: every training case of the store is labeled.")
    assert not ui.nextCaseButton.enabled and not ui.rankButton.enabled
