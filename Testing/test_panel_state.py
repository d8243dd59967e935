"""What the panel enables and says in each situation, and installing dependencies only after
asking (plain Python: no Slicer, no Qt, no network)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "GuidedSeg"))

from GuidedSegPanel import install
from GuidedSegPanel.state import PanelState, view
from GuidedSegPanel.terminology import terminology_entry

READY = {"has_volume": True, "model_count": 2, "has_model": True, "has_store": True}


def test_segment_turns_into_cancel_while_running_and_locks_the_inputs():
    idle = view(PanelState(**READY))
    assert (idle.segment_text, idle.segment_enabled, idle.inputs_enabled) == ("Segment", True, True)
    running = view(PanelState(**READY, segmenting=True, has_segmentation=True))
    assert (running.segment_text, running.segment_enabled, running.inputs_enabled) == ("Cancel", True, False)
    assert not running.export_enabled and not running.correct_enabled  # the segmentation is about to change
    done = view(PanelState(**READY, has_segmentation=True))
    assert done.correct_enabled and done.export_enabled and done.message == ""


def test_each_missing_piece_is_named_and_keeps_its_button_off():
    assert view(PanelState(**{**READY, "has_volume": False})).segment_tooltip == "Choose an input volume first"
    broken = view(PanelState(**READY, model_problem="/m/x: is not valid JSON"))
    assert not broken.segment_enabled and "/m/x: is not valid JSON" in broken.message
    empty = view(PanelState(has_volume=True))
    assert "holds no model bundle yet" in empty.message and not empty.segment_enabled
    no_folder = view(PanelState(models_folder_problem="Choose a models folder (...)", has_store=True))
    assert "Choose a models folder" in no_folder.message and not no_folder.train_enabled
    no_store = view(PanelState(**{**READY, "has_store": False}, has_segmentation=True))
    assert not no_store.export_enabled and no_store.export_tooltip == "Choose a case store first"
    bad_store = view(PanelState(**READY, has_segmentation=True, store_problem="/s: is not a case store"))
    assert not bad_store.export_enabled and not bad_store.train_enabled and "/s: is not a case store" in bad_store.message


def test_missing_packages_show_install_but_do_not_block_segment():
    state = view(PanelState(**READY, missing_packages=["torch", "monai"]))
    assert state.install_visible and "lacks torch, monai" in state.message
    assert state.segment_enabled  # clicking it offers the install


def test_train_button_cancels_while_training():
    training = view(PanelState(**READY, training=True))
    assert training.train_text == "Cancel training" and training.train_enabled
    assert training.segment_enabled  # annotating goes on while a model trains
    assert not view(PanelState(**READY, train_script_found=False)).train_enabled


def test_install_asks_first_and_installs_nothing_when_declined():
    calls = []
    missing = install.missing(lambda name: None if name in ("torch", "monai", "yaml") else object())
    assert [r.package for r in missing] == ["torch", "monai", "pyyaml"]
    with pytest.raises(install.InstallDeclined):
        install.install(missing, confirm=lambda text: calls.append(text) or False, pip_install=calls.append)
    assert len(calls) == 1 and "torch, monai, pyyaml" in calls[0] and "1-3 GB" in calls[0]


def test_install_takes_torch_from_pytorch_utils_when_present_and_the_rest_from_pip():
    pip, torch_calls = [], []
    done = install.install(install.missing(lambda name: None if name in ("torch", "monai") else object()),
                           confirm=lambda text: True, pip_install=pip.append,
                           install_torch=lambda version: torch_calls.append(version) or True)
    assert torch_calls == [install.TORCH_REQUIREMENT] and pip == ["monai>=1.3"]
    assert done == [f"torch{install.TORCH_REQUIREMENT}", "monai>=1.3"]
    pip.clear()
    install.install([install.REQUIREMENTS[0]], confirm=lambda text: True, pip_install=pip.append)
    assert pip == [f"torch{install.TORCH_REQUIREMENT}"]  # no PyTorch Utils: pip


def test_a_failed_install_names_the_package():
    def pip(spec):
        raise OSError("network unreachable")

    with pytest.raises(RuntimeError, match=r"Installing monai>=1.3 failed: network unreachable"):
        install.install([install.REQUIREMENTS[1]], confirm=lambda text: True, pip_install=pip)
    assert install.install([], confirm=lambda text: pytest.fail("asked for nothing"), pip_install=pip) == []


def test_organ_names_map_to_standard_codes():
    assert terminology_entry("Liver").split("~")[2] == "SCT^10200004^Liver"
    assert terminology_entry("kidney-right").split("~")[2:4] == ["SCT^64033007^Kidney", "SCT^24028007^Right"]
    assert terminology_entry("inferior vena cava").split("~")[2] == "SCT^64131007^Inferior vena cava"
    assert terminology_entry("tumour blob") is None
