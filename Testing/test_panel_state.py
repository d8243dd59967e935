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
    assert empty.message.startswith("No model yet. Import a model bundle") and not empty.segment_enabled
    assert "Train a starter model" in empty.message and empty.starter_visible
    assert not view(PanelState(**READY)).starter_visible
    training = view(PanelState(has_volume=True, training=True))
    assert not training.starter_visible and "appears in the model list when done" in training.message
    no_folder = view(PanelState(models_folder_problem="Choose a models folder (...)", models_folder_chosen=False,
                                has_store=True))
    assert no_folder.message.startswith("No model yet") and no_folder.starter_visible and not no_folder.train_enabled
    gone = view(PanelState(models_folder_problem="/m: the models folder does not exist.", has_store=True))
    assert gone.message.startswith("/m: the models folder does not exist.") and not gone.train_enabled
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


def test_install_is_one_action_torch_from_pytorch_utils_and_the_rest_in_one_call():
    pip, torch_calls, ensured = [], [], []
    questions = []
    missing = install.missing(lambda name: None if name in ("torch", "monai", "yaml") else object())
    done = install.install(missing, confirm=lambda text: questions.append(text) or True, pip_install=pip.append,
                           install_torch=lambda version: torch_calls.append(version) or True)
    assert len(questions) == 1 and torch_calls == [install.TORCH_REQUIREMENT] and pip == ["monai>=1.3 pyyaml>=6"]
    assert done == [f"torch{install.TORCH_REQUIREMENT}", "monai>=1.3", "pyyaml>=6"]
    pip.clear()
    install.install(missing, confirm=lambda text: True, pip_install=pip.append, pip_ensure=ensured.append)
    assert pip == [f"torch{install.TORCH_REQUIREMENT}"]  # no PyTorch Utils: one pip call for torch
    assert ensured == [["monai>=1.3", "pyyaml>=6"]]  # Slicer 5.12: the rest through one pip_ensure


def test_install_takes_the_torch_build_the_user_chose():
    pip, questions = [], []
    install.install([install.REQUIREMENTS[0]], confirm=lambda text: questions.append(text) or True,
                    pip_install=pip.append, torch_build="cpu")
    assert pip == [f"torch{install.TORCH_REQUIREMENT} --index-url https://download.pytorch.org/whl/cpu"]
    assert "CPU-only build" in questions[0]
    pip.clear()
    install.install([install.REQUIREMENTS[0]], confirm=lambda text: True, pip_install=pip.append, torch_build="cuda")
    assert pip == [f"torch{install.TORCH_REQUIREMENT} --index-url https://download.pytorch.org/whl/cu126"]
    with pytest.raises(ValueError, match="torch build 'rocm' is not one of"):
        install.torch_pip_arguments("rocm")


def test_organ_names_map_to_standard_codes():
    assert terminology_entry("Liver").split("~")[2] == "SCT^10200004^Liver"
    assert terminology_entry("kidney-right").split("~")[2:4] == ["SCT^64033007^Kidney", "SCT^24028007^Right"]
    assert terminology_entry("inferior vena cava").split("~")[2] == "SCT^64131007^Inferior vena cava"
    assert terminology_entry("tumour blob") is None


def test_long_paths_are_elided_to_their_last_parts():
    from GuidedSegPanel.state import elide_path

    long = "/tmp/pytest-of-someone/pytest-113/test_a_long_name_here0/models/three-organs"
    short = elide_path(long)
    assert short == ".../test_a_long_name_here0/models/three-organs" and len(short) <= 48
    assert elide_path(long, limit=30) == ".../models/three-organs"
    assert elide_path("/data/models") == "/data/models"
    assert len(elide_path("/x/" + "y" * 80)) <= 48 and elide_path("/x/" + "y" * 80).endswith("yyyy")


def test_the_loop_says_when_the_queue_is_empty_and_fine_tune_turns_into_cancel():
    queued = view(PanelState(**READY, queue_length=3, labeled_count=2, current_case="case_7"))
    assert queued.next_enabled and queued.rank_enabled and queued.reopen_enabled
    assert queued.queue_text == "Current case: case_7. 3 unlabeled case(s) in the queue."
    empty = view(PanelState(**READY, queue_length=0, labeled_count=5))
    assert empty.queue_text == "The queue is empty: every training case of the store is labeled."
    assert not empty.next_enabled and not empty.rank_enabled and empty.reopen_enabled
    assert view(PanelState(**READY, queue_length=2)).fine_tune_enabled
    running = view(PanelState(**READY, fine_tuning=True))
    assert (running.fine_tune_text, running.fine_tune_enabled) == ("Cancel fine-tune", True)
    assert not view(PanelState(**READY, training=True)).fine_tune_enabled  # one training at a time
    assert not view(PanelState(**{**READY, "has_model": False})).fine_tune_enabled  # nothing to start from
    assert view(PanelState(**READY, has_parent=True)).parent_enabled and not view(PanelState(**READY)).parent_enabled
