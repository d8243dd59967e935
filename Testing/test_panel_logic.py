"""The panel's logic driven as the widget drives it (slicer-core, no Qt): what it enables and says,
Segment in the background with Cancel, a failing model's readable error, export into the store,
and Train listing its new bundle. The child processes are stand-ins that follow the CLI's
progress protocol, so this runs without torch and in seconds."""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import oblique_case, run_until_finished

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "GuidedSeg"))

slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the 'slicer' module here is not slicer-core", allow_module_level=True)

from GuidedSegPanel import commands, models, nodes, state
from GuidedSegPanel.logic import PanelLogic

from GuidedSegLib.imageio import write_label_map
from GuidedSegLib.store import CaseStore

LABELS = {"0": "background", "1": "liver", "2": "spleen", "3": "kidney_left"}

# Stands in for Slicer's Python: "-m GuidedSegLib.cli segment ..." and "train.py ..." follow the
# protocol (progress lines, error line + exit 2, SIGTERM -> exit 143 without output); "-c" runs.
FAKE_PYTHON = """
    import json, os, shutil, signal, subprocess, sys, time
    args = sys.argv[1:]
    mode = os.environ.get("FAKE_MODE", "ok")
    def emit(**record):
        print(json.dumps(record), flush=True)
    if args[0] == "-c" and mode == "gpu":  # the device probe on a machine with one NVIDIA GPU
        emit(stage="done", progress=1.0, devices=[{{"id": "cpu", "name": "CPU"}},
             {{"id": "cuda:0", "name": "GPU 0: NVIDIA H200"}}], torch="2.13.0+cu126", cuda="12.6", monai="1.6.1")
        sys.exit(0)
    if args[0] == "-c":
        sys.exit(subprocess.call([{python!r}] + args))
    def opt(name):
        return args[args.index(name) + 1]
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))
    if args[:3] == ["-m", "GuidedSegLib.cli", "segment"]:
        assert args[-2:] == ["--progress", "json"], args
        if mode == "oom" and opt("--device") != "cpu":
            emit(stage="infer", progress=0.3)
            print("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", file=sys.stderr)
            sys.exit(1)
        if mode == "fail":
            emit(stage="load", progress=0.0)
            print("guidedseg: error: " + opt("--model") + ": weights of network A do not fit its description",
                  file=sys.stderr)
            sys.exit(2)
        for i, stage in enumerate(["load", "read", "preprocess", "infer", "restore", "write"]):
            emit(stage=stage, progress=i / 6)
            print("log line " + stage, flush=True)
            time.sleep(30 if mode == "slow" and stage == "infer" else 0.01)
        shutil.copyfile(os.environ["FAKE_LABEL"], opt("--output"))
        emit(stage="done", progress=1.0, outputs=[opt("--output")])
    elif args[0].endswith("train.py"):
        out = opt("--output")
        emit(stage="prepare-train", progress=0.5)
        for i in range(1, 4):
            emit(stage="train", progress=i / 3, iteration=i, loss=1.0 / i, eta_s=3 - i)
        emit(stage="message", text="validation Dice 0.5")
        bundle = os.path.join(out, "bundle")
        os.makedirs(bundle)
        json.dump({{"format": 1, "name": "trained-" + opt("--method"), "method": opt("--method"),
                    "labels": {labels!r}, "validation": {{"mean_dice": 0.5, "per_organ": {{}}}}}},
                  open(os.path.join(bundle, "model.json"), "w"))
        emit(stage="done", progress=1.0, bundle=bundle)
    else:
        sys.exit("unexpected command " + repr(args))
"""


@pytest.fixture
def panel(tmp_path, mrml, monkeypatch):
    scene, seg_logic = mrml
    scene.Clear(0)
    fake = tmp_path / "fake-python"
    fake.write_text(f"#!{sys.executable}\n" + textwrap.dedent(FAKE_PYTHON.format(python=sys.executable,
                                                                                 labels=LABELS)))
    fake.chmod(0o755)
    image, label = oblique_case(size=(40, 36, 12))
    label_file = write_label_map(label, tmp_path / "model-output.nrrd")
    monkeypatch.setenv("FAKE_LABEL", str(label_file))
    models_folder = tmp_path / "models"
    (models_folder / "tiny").mkdir(parents=True)
    (models_folder / "tiny" / "model.json").write_text(json.dumps({
        "format": 1, "name": "tiny", "method": "guidednet", "labels": LABELS, "networks": ["A", "B"],
        "colours": {"1": [0.867, 0.51, 0.396], "2": [0.616, 0.424, 0.635], "3": [0.725, 0.4, 0.325]},
        "validation": {"mean_dice": 0.81, "per_organ": {"1": {"dice": 0.9, "sd": 0.1, "n": 3},
                                                        "2": {"dice": 0.72, "sd": 0.1, "n": 3}}},
        "training": {"selection": "best validation Dice of 3 held-out cases"}}))
    work = tmp_path / "work"
    work.mkdir()
    logic = PanelLogic(scene, seg_logic, python=str(fake), work_root=work, find_spec=lambda name: object())
    logic.set_models_folder(models_folder)
    volume = nodes.image_to_volume(image, scene, "abdomen")
    return logic, volume, image, label, work


def test_models_folder_lists_bundles_with_labels_and_validation_dice(tmp_path, panel):
    logic = panel[0]
    (Path(logic.models_folder) / "broken").mkdir()
    (Path(logic.models_folder) / "broken" / "model.json").write_text("{not json")
    (Path(logic.models_folder) / ".tmp-1234-writing").mkdir()
    (Path(logic.models_folder) / ".tmp-1234-writing" / "model.json").write_text("{}")
    listed = logic.refresh_models()
    assert [m.name for m in listed] == ["broken", "tiny"]
    broken, tiny = listed
    assert not broken.usable and "is not valid JSON" in broken.problem and "cannot be used" in broken.title()
    assert tiny.title() == "tiny (guidednet, mean Dice 0.81)" and tiny.ensemble_possible
    assert tiny.labels == {1: "liver", 2: "spleen", 3: "kidney_left"}
    assert tiny.colours[1] == pytest.approx((0.867, 0.51, 0.396))
    assert "1 liver (0.90), 2 spleen (0.72), 3 kidney_left" in tiny.description()
    assert "Weights: best validation Dice of 3 held-out cases" in tiny.description()  # how they were chosen
    assert models.folder_problem(tmp_path / "nope").endswith("the models folder does not exist.")
    assert models.list_models(tmp_path / "nope") == []


def test_state_before_anything_is_chosen_says_what_to_do(panel, tmp_path):
    logic = panel[0]
    logic.find_spec = lambda name: None if name in ("torch", "monai") else object()
    view = state.view(logic.state())
    assert view.install_visible and "lacks torch, monai" in view.message
    assert not view.segment_enabled and view.segment_tooltip == "Choose an input volume first"
    assert not view.export_enabled and not view.correct_enabled and not view.train_enabled
    logic.parameters.store = str(tmp_path / "no-store")
    view = state.view(logic.state())
    assert "is not a case store" in view.message and not view.train_enabled


def test_segment_runs_in_the_background_and_becomes_named_segments(panel):
    logic, volume, *_ = panel
    p = logic.parameters
    p.input_volume = volume
    p.model = str(Path(logic.models_folder) / "tiny")
    p.ensemble = True
    view = state.view(logic.state())
    assert view.segment_enabled and view.segment_text == "Segment" and not view.install_visible

    job = logic.start_segment()
    assert "--ensemble" in job.argv and job.input.is_file()
    view = state.view(logic.state())
    assert view.segment_text == "Cancel" and view.segment_enabled and not view.inputs_enabled
    updates = run_until_finished(logic, "segment")
    texts = [u.text for u in updates if u.text]
    assert texts[:6] == ["Loading the model", "Reading the volume", "Preprocessing", "Running the network",
                         "Placing the result on the volume's grid", "Writing the result"]
    assert any("log line infer" in line for u in updates for line in u.log)
    final = updates[-1]
    assert final.finished and final.ok, final.error
    node = final.result
    assert p.segmentation is node and node.GetAttribute(nodes.MODEL_NAME_ATTRIBUTE) == "tiny"
    assert sorted(name for _, name in nodes.segments(node)) == ["kidney_left", "liver", "spleen"]
    assert not job.folder.exists()  # nothing left in the temporary folder: the draft is in the scene
    draft = nodes.draft_node(node)
    assert draft is not None and draft.GetHideFromEditors() and draft.GetScene() is logic.scene
    assert final.elapsed_s is not None and final.elapsed_s > 0
    view = state.view(logic.state())
    assert view.segment_text == "Segment" and view.correct_enabled and not view.export_enabled  # no store yet


def test_cancel_ends_segment_within_a_second_and_keeps_nothing(panel):
    logic, volume, *_, work = panel
    os.environ["FAKE_MODE"] = "slow"
    try:
        logic.parameters.input_volume = volume
        logic.parameters.model = str(Path(logic.models_folder) / "tiny")
        job = logic.start_segment()
        deadline = time.monotonic() + 20
        while not any(u.text == "Running the network" for u in logic.poll()):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        start = time.monotonic()
        logic.cancel("segment")
        updates = run_until_finished(logic, "segment", timeout=5)
        assert time.monotonic() - start < 1.0
    finally:
        del os.environ["FAKE_MODE"]
    assert updates[-1].error == "cancelled" and not updates[-1].ok
    assert not job.folder.exists() and list(work.iterdir()) == []
    assert logic.parameters.segmentation is None and not logic.running("segment")


def test_a_failing_model_gives_a_readable_error(panel, monkeypatch):
    logic, volume, *_, work = panel
    monkeypatch.setenv("FAKE_MODE", "fail")
    logic.parameters.input_volume = volume
    logic.parameters.model = str(Path(logic.models_folder) / "tiny")
    logic.start_segment()
    final = run_until_finished(logic, "segment")[-1]
    assert not final.ok and final.error == (f"guidedseg: error: {Path(logic.models_folder) / 'tiny'}: "
                                            "weights of network A do not fit its description")
    assert list(work.iterdir()) == [] and logic.parameters.segmentation is None


def test_export_and_train_from_the_panel(panel, tmp_path):
    logic, volume, _, label, _ = panel
    p = logic.parameters
    p.input_volume = volume
    p.model = str(Path(logic.models_folder) / "tiny")
    logic.start_segment()
    node = run_until_finished(logic, "segment")[-1].result
    store = CaseStore.create(tmp_path / "store", {1: "liver", 2: "spleen", 3: "kidney_left"})
    p.store = str(store.root)
    view = state.view(logic.state())
    assert view.export_enabled and view.train_enabled and view.train_text == "Train"

    # erase the liver's first slices, as an annotator correcting a leak would
    scene, seg_logic = logic.scene, logic.segmentations_logic
    liver = node.GetSegmentation().GetSegmentIdBySegmentName("liver")
    mask = nodes.segment_mask(node, liver, volume, seg_logic, scene).astype(np.uint8)
    mask[:3] = 0
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    labelmap.CopyOrientation(volume)
    slicer.util.updateVolumeFromArray(labelmap, mask)
    assert seg_logic.ImportLabelmapToSegmentationNode(labelmap, node, "edited")
    new_id = node.GetSegmentation().GetNthSegmentID(node.GetSegmentation().GetNumberOfSegments() - 1)
    node.GetSegmentation().RemoveSegment(liver)
    node.GetSegmentation().GetSegment(new_id).SetName("liver")
    scene.RemoveNode(labelmap)

    plan = logic.plan_export()
    assert plan.edited == [1] and plan.model == "tiny"
    case = logic.export(plan, checked=[3])
    assert case.annotated == (1, 3) and case.history[-1]["model"] == "tiny"
    assert "GuidedSeg Slicer panel" in case.history[-1]["source"]
    expected = sitk.GetArrayFromImage(label).copy()
    expected[:3][expected[:3] == 1] = 0
    expected[expected == 2] = 0
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(case.label))), expected)

    job = logic.start_train()
    assert job.argv[job.argv.index("--store") + 1] == str(store.root)
    assert state.view(logic.state()).train_text == "Cancel training"
    updates = run_until_finished(logic, "train")
    texts = [u.text for u in updates]
    assert "Training: iteration 1, loss 1.000, 2 s left" in texts and "Training: iteration 3, loss 0.333" in texts
    assert any("validation Dice 0.5" in line for u in updates for line in u.log)
    final = updates[-1]
    assert final.ok and final.result == job.output / "bundle"
    assert p.model == str(job.output / "bundle") and logic.selected_model().name == "trained-guidednet"
    assert [m.name for m in logic.models] == ["tiny", "trained-guidednet"]


def paint(logic, node, volume, name, mask):
    """What painting in the Segment Editor leaves: segment ``name`` now holds exactly ``mask``."""
    scene, seg_logic = logic.scene, logic.segmentations_logic
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    labelmap.CopyOrientation(volume)
    slicer.util.updateVolumeFromArray(labelmap, mask.astype(np.uint8))
    old = node.GetSegmentation().GetSegmentIdBySegmentName(name)
    assert seg_logic.ImportLabelmapToSegmentationNode(labelmap, node, "edited")
    new = node.GetSegmentation().GetNthSegmentID(node.GetSegmentation().GetNumberOfSegments() - 1)
    node.GetSegmentation().RemoveSegment(old)
    node.GetSegmentation().GetSegment(new).SetName(name)
    scene.RemoveNode(labelmap)


def liver_of(logic, node, volume):
    segment = node.GetSegmentation().GetSegmentIdBySegmentName("liver")
    return nodes.segment_mask(node, segment, volume, logic.segmentations_logic, logic.scene)


def test_segment_again_goes_into_a_new_node_and_the_correction_survives(panel):
    logic, volume, _, label, _ = panel
    p = logic.parameters
    p.input_volume, p.model = volume, str(Path(logic.models_folder) / "tiny")
    logic.start_segment()
    first = run_until_finished(logic, "segment")[-1].result
    corrected = sitk.GetArrayFromImage(label) == 1
    corrected[:4] = False
    paint(logic, first, volume, "liver", corrected)

    assert logic.start_segment() is not None  # no question: nothing is replaced
    second = run_until_finished(logic, "segment")[-1].result
    assert second.GetID() != first.GetID() and p.segmentation is second
    assert first.GetScene() is logic.scene and np.array_equal(liver_of(logic, first, volume), corrected)
    assert np.array_equal(liver_of(logic, second, volume), sitk.GetArrayFromImage(label) == 1)
    assert second.GetName() != first.GetName()
    assert logic.corrections(first) == ["liver"] and logic.corrections(second) == []


def test_replacing_a_corrected_node_asks_first_and_no_means_nothing_runs(panel):
    logic, volume, _, label, _ = panel
    p = logic.parameters
    p.input_volume, p.model = volume, str(Path(logic.models_folder) / "tiny")
    logic.start_segment()
    node = run_until_finished(logic, "segment")[-1].result
    old_draft = nodes.draft_node(node)
    # replacing an uncorrected node asks nothing and keeps the node
    p.replace_segmentation = True
    assert logic.start_segment() is not None
    assert run_until_finished(logic, "segment")[-1].result is node and old_draft.GetScene() is None

    corrected = sitk.GetArrayFromImage(label) == 1
    corrected[:4] = False
    paint(logic, node, volume, "liver", corrected)
    questions = []
    assert logic.start_segment() is None  # no way to ask: nothing runs
    assert logic.start_segment(confirm_replace=lambda q: questions.append(q) or False) is None
    assert not logic.running("segment") and "liver" in questions[0] and node.GetName() in questions[0]
    assert np.array_equal(liver_of(logic, node, volume), corrected)

    assert logic.start_segment(confirm_replace=lambda q: True) is not None  # the user agreed
    assert run_until_finished(logic, "segment")[-1].result is node
    assert np.array_equal(liver_of(logic, node, volume), sitk.GetArrayFromImage(label) == 1)


def test_a_correction_made_while_the_model_runs_is_not_replaced(panel):
    logic, volume, _, label, _ = panel
    p = logic.parameters
    p.input_volume, p.model = volume, str(Path(logic.models_folder) / "tiny")
    logic.start_segment()
    node = run_until_finished(logic, "segment")[-1].result
    p.replace_segmentation = True
    assert logic.start_segment() is not None  # no corrections yet: no question
    corrected = sitk.GetArrayFromImage(label) == 1
    corrected[:4] = False
    paint(logic, node, volume, "liver", corrected)  # painted while the child runs
    result = run_until_finished(logic, "segment")[-1].result
    assert result.GetID() != node.GetID() and np.array_equal(liver_of(logic, node, volume), corrected)


def test_the_gpu_is_the_default_once_the_probe_finds_one_and_the_versions_are_shown(panel, monkeypatch):
    logic = panel[0]
    monkeypatch.setenv("FAKE_MODE", "gpu")
    assert logic.parameters.device == "cpu" and not logic.parameters.device_chosen
    logic.start_device_probe()
    run_until_finished(logic, "devices")
    assert logic.parameters.device == "cuda:0" and logic.device_name() == "GPU 0: NVIDIA H200"
    assert commands.environment_text(logic.environment, logic.device_name()) == \
        "PyTorch 2.13.0+cu126 (CUDA 12.6), MONAI 1.6.1. Segment runs on: GPU 0: NVIDIA H200"
    # a device the user chose is kept
    logic.parameters.device, logic.parameters.device_chosen = "cpu", True
    logic.start_device_probe()
    run_until_finished(logic, "devices")
    assert logic.parameters.device == "cpu"


def test_out_of_gpu_memory_falls_back_to_the_cpu_with_a_message(panel, monkeypatch):
    logic, volume, _, label, _ = panel
    monkeypatch.setenv("FAKE_MODE", "oom")
    p = logic.parameters
    p.input_volume, p.model, p.device = volume, str(Path(logic.models_folder) / "tiny"), "cuda:0"
    first = logic.start_segment()
    updates = run_until_finished(logic, "segment")
    assert "The GPU ran out of memory: segmenting on the CPU instead" in [u.text for u in updates]
    assert any("CUDA out of memory" in line for u in updates for line in u.log)
    final = updates[-1]
    assert final.ok and final.result is p.segmentation, final.error
    assert first.argv[first.argv.index("--device") + 1] == "cuda:0"
    assert np.array_equal(liver_of(logic, final.result, volume), sitk.GetArrayFromImage(label) == 1)


def test_a_bundle_is_imported_from_a_folder_or_a_zip_checked_first_and_never_over_another(panel, tiny_bundle,
                                                                                          tmp_path):
    import zipfile

    logic = panel[0]
    folder = tmp_path / "downloaded" / "three-organs"
    import shutil
    shutil.copytree(tiny_bundle, folder)
    model = logic.import_model(folder)
    assert model.usable and model.path == Path(logic.models_folder) / "three-organs"
    assert logic.selected_model() == model and folder.is_dir()  # the source stays where it was
    weights = (model.path / "weights.safetensors").read_bytes()

    archive = tmp_path / "three-organs.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in folder.iterdir():
            z.write(f, f"three-organs/{f.name}")
    again = logic.import_model(archive)
    assert again.path.name == "three-organs-2" and again.usable
    assert (model.path / "weights.safetensors").read_bytes() == weights  # the first one is untouched
    assert sorted(m.path.name for m in logic.models) == ["three-organs", "three-organs-2", "tiny"]

    broken = tmp_path / "broken.zip"
    with zipfile.ZipFile(broken, "w") as z:
        z.write(folder / "model.json", "broken/model.json")  # no weights
    with pytest.raises(ValueError, match=r"broken\.zip: .*weights\.safetensors: missing"):
        logic.import_model(broken)
    escaping = tmp_path / "escaping.zip"
    with zipfile.ZipFile(escaping, "w") as z:
        z.writestr("../outside/model.json", "{}")
    with pytest.raises(ValueError, match="a path outside itself"):
        logic.import_model(escaping)
    with pytest.raises(ValueError, match="not a GuidedSeg model bundle"):
        logic.import_model(tmp_path / "downloaded")  # a folder with no model.json where it looks
    leftovers = [p.name for p in Path(logic.models_folder).iterdir()]
    assert sorted(leftovers) == ["three-organs", "three-organs-2", "tiny"] and not (tmp_path / "outside").exists()


def test_the_starter_model_trains_on_phantoms_in_the_background_and_is_selected(panel):
    logic = panel[0]
    job = logic.start_starter_training()
    # the demo's measured training: supervised, 1000 steps, 8 labeled phantoms
    assert "--store" not in job.argv and job.argv[job.argv.index("--method") + 1] == "supervised"
    assert {"phantoms.labeled=8", "optim.iterations=1000", "data.augment=false"} <= set(job.argv)
    assert job.output.parent == Path(logic.models_folder) and job.output.name.startswith("starter-phantoms-")
    final = run_until_finished(logic, "train")[-1]
    assert final.ok and logic.selected_model().path == job.output / "bundle"
