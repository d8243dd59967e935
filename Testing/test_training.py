"""Training end to end on small phantoms: it learns, resumes exactly, runs under torchrun, writes a
bundle, and refuses bad stores and settings before it starts."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from GuidedSegLib.devices import cpu_has_native_bf16
from GuidedSegLib.phantoms import generate_phantom, write_phantom_store
from GuidedSegLib.store import CaseStore

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from Training.config import ConfigError, load_config
from Training.trainer import TrainingSetupError, train

TINY = ["network.widths=[4,8,16,32]", "network.feature_layer=3", "data.patch=[32,32,32]", "data.labeled_batch=2",
        "data.unlabeled_batch=2", "validation.every=1000", "validation.fraction=0.2", "checkpoint_every=1000"]


@pytest.fixture(scope="module")
def phantom_store(tmp_path_factory) -> Path:
    """5 labeled (4 train + 1 validation) and 4 unlabeled phantoms."""
    root = tmp_path_factory.mktemp("phantoms") / "store"
    write_phantom_store(root, cases=9, labeled=5, test=0, seed=3)
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def run_train(store: Path, output: Path, cache: Path, *overrides: str, method: str = "guidednet",
              resume: bool = False, torchrun: int = 0, wait: bool = True):
    args = [str(ROOT / "Training" / "train.py"), "--store", str(store), "--output", str(output),
            "--method", method, "--device", "cpu", "--progress", "json", f"data.cache={cache}", *TINY, *overrides]
    if resume:
        args.append("--resume")
    if torchrun:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}", *args]
    else:
        command = [sys.executable, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, encoding="utf-8", env=env, cwd=ROOT)
    if not wait:
        return process
    out, err = process.communicate(timeout=600)
    return process.returncode, out, err


def losses(output: Path) -> dict[int, float]:
    with open(output / "log.csv", newline="") as handle:
        return {int(r["iteration"]): float(r["total"]) for r in csv.DictReader(handle)}


def test_supervised_training_learns_the_organs(three_organ_run):
    """Coarse three-organ phantoms (conftest): 4 labeled, 2 unlabeled; supervised, 120 iterations."""
    output, code, out, err = three_organ_run
    assert code == 0, err
    log = losses(output)
    early, late = np.mean([log[i] for i in range(1, 11)]), np.mean([log[i] for i in range(111, 121)])
    assert late < 0.5 * early, f"loss went from {early:.3f} to only {late:.3f} in 120 iterations"
    model = json.loads((output / "bundle" / "model.json").read_text())
    dice = {model["labels"][k]: v["dice"] for k, v in model["validation"]["per_organ"].items()}
    print("validation Dice after 120 iterations:", dice)
    assert dice["liver"] > 0.75, f"validation Dice after 120 iterations: {dice}"
    events = [json.loads(line) for line in out.splitlines()]
    assert events[-1] == {"stage": "done", "progress": 1.0, "bundle": str(output / "bundle")}
    assert any(e["stage"] == "train" and "eta_s" in e for e in events)
    # Validation reports each case and its sliding-window steps (the panel reads these lines).
    validating = [e for e in events if e["stage"] == "validate"]
    assert validating and all({"case", "index", "total", "step", "steps"} <= set(e) for e in validating)
    assert validating[0]["step"] == 0 and validating[0]["steps"] > 0 and 0 <= validating[-1]["progress"] < 1
    # Supervised training uses no unlabeled case, and says so instead of counting them.
    assert "0 unlabeled (2 unlabeled not used)" in out and model["training"]["unlabeled"] == 0


def test_a_progress_bar_saved_to_a_log_is_lines_with_validation_progress(phantom_store, cache, tmp_path):
    code, out, err = run_train(phantom_store, tmp_path / "run", cache, "optim.iterations=2", "validation.every=1",
                               "--progress", "bar", method="supervised")
    assert code == 0, err
    assert "\r" not in err, "carriage returns in a log saved to a file"
    assert "training: 2/2 it" in err and "validate=1/1 phantom_" in err


def test_bundle_holds_what_inference_needs(phantom_store, cache, tmp_path):
    from GuidedSegLib.bundle import load_networks

    output = tmp_path / "run"
    # optim.amp=on: bf16 autocast and channels-last on a CPU with bf16 hardware (the YAML "on" is read as text)
    code, out, err = run_train(phantom_store, output, cache, "optim.iterations=2", "optim.amp=on", method="cps")
    assert code == 0, err
    emulated = "warning: optim.amp=on ignored: this CPU has no bfloat16 hardware" in out
    assert emulated == (not cpu_has_native_bf16()), out
    # TINY's 4 full-resolution channels for 14 classes is the width that left most phantom organs unlearned
    assert "warning: network.widths starts at 4 channels for 14 classes" in out and "at least 7" in out
    metadata, networks = load_networks(output / "bundle")
    assert metadata["training"]["config"]["optim"]["amp"] == "on"
    assert not metadata["training"]["config"]["objective"]["kt_cps"]  # as run: cps has no KT-CPS, no CGMM
    assert not metadata["training"]["config"]["objective"]["cgmm"]
    assert sorted(networks) == ["A", "B"]
    assert metadata["method"] == "cps" and metadata["patch"] == [32, 32, 32] and metadata["stride"] == [16, 16, 16]
    assert metadata["labels"]["1"] == "liver" and len(metadata["labels"]) == 14
    assert metadata["preprocessing"]["source"] == "planned"
    store = CaseStore(phantom_store)
    assert set(metadata["training"]["labeled"]) | set(metadata["training"]["validation"]) == \
        {c.case_id for c in store.cases("labeled")}
    assert metadata["training"]["unlabeled"] == 4
    import torch

    logits, _ = networks["A"](torch.zeros(1, 1, 32, 32, 32))
    assert logits.shape == (1, 14, 32, 32, 32)
    # A second run into the same folder is refused instead of overwriting anything.
    code, _, err = run_train(phantom_store, output, cache, "optim.iterations=2", method="cps")
    assert code == 2 and "--resume" in err


def test_resume_after_kill_continues_exactly(phantom_store, cache, tmp_path):
    reference = tmp_path / "reference"
    code, _, err = run_train(phantom_store, reference, cache, "optim.iterations=6", "checkpoint_every=2")
    assert code == 0, err
    expected = losses(reference)

    crashed = tmp_path / "crashed"
    process = run_train(phantom_store, crashed, cache, "optim.iterations=6", "checkpoint_every=2", wait=False)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if (crashed / "log.csv").exists() and len(losses(crashed)) >= 3:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert not (crashed / "bundle").exists(), "killed before the end yet a bundle was written"
    # As the stop message says: --output and --resume alone; every setting comes from the saved run.
    code, out, err = resume_only(crashed)
    assert code == 0, err
    assert "resuming" in out
    resumed = losses(crashed)
    assert sorted(resumed) == list(range(1, 7))
    assert resumed == expected, f"resumed losses differ:\n{resumed}\n{expected}"

    # A finished run resumed says so and writes nothing.
    before = {p: p.stat().st_mtime_ns for p in crashed.rglob("*")}
    code, out, err = resume_only(crashed)
    assert code == 0, err
    assert "the run is complete" in out and str(crashed / "bundle") in out
    assert {p: p.stat().st_mtime_ns for p in crashed.rglob("*")} == before
    # Changing a setting while resuming is refused, naming the setting and both values.
    code, out, err = resume_only(crashed, "optim.iterations=8")
    assert code == 2 and "optim.iterations 6 -> 8" in err and len(err.strip().splitlines()) == 1


def resume_only(output: Path, *overrides: str):
    result = subprocess.run([sys.executable, str(ROOT / "Training" / "train.py"), "--output", str(output), "--resume",
                             "--progress", "json", *overrides], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    return result.returncode, result.stdout, result.stderr


def test_sigterm_stops_cleanly_with_a_checkpoint(phantom_store, cache, tmp_path):
    output = tmp_path / "run"
    process = run_train(phantom_store, output, cache, "optim.iterations=500", wait=False)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not ((output / "log.csv").exists() and len(losses(output)) >= 2):
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, err
    assert f"continue with --resume: python Training/train.py --output {output} --resume" in out
    import torch

    state = torch.load(output / "checkpoint.pt", weights_only=True)
    assert 2 <= state["iteration"] < 500


def test_two_process_torchrun_matches_one_process(phantom_store, cache, tmp_path):
    settings = ["optim.iterations=3", "network.dropout=0.0", "data.labeled_batch=2", "data.unlabeled_batch=2"]
    code, _, err = run_train(phantom_store, tmp_path / "one", cache, *settings)
    assert code == 0, err
    code, _, err = run_train(phantom_store, tmp_path / "two", cache, *settings, torchrun=2)
    assert code == 0, err
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(two) == [1, 2, 3]
    for i in one:
        assert two[i] == pytest.approx(one[i], rel=2e-4), f"iteration {i}: 1 process {one[i]}, 2 processes {two[i]}"


def test_a_non_finite_gradient_skips_its_step_instead_of_poisoning_the_weights(phantom_store, cache, tmp_path,
                                                                              monkeypatch, capsys):
    """One NaN gradient (as PyTorch's bf16 CPU convolutions produce for 2-deep maps) must not reach
    the optimiser: AdamW would carry it into every weight and every later step."""
    import itertools

    import Training.trainer as trainer

    built = trainer.build_method

    def build_with_a_nan_at_the_second_backward(*args, **kwargs):
        method = built(*args, **kwargs)
        calls = itertools.count()
        first = next(method.networks["A"].parameters())
        first.register_hook(lambda grad: grad * float("nan") if next(calls) == 1 else grad)
        return method

    monkeypatch.setattr(trainer, "build_method", build_with_a_nan_at_the_second_backward)
    output = tmp_path / "run"
    result = train(config(phantom_store, output, f"data.cache={cache}", "optim.iterations=4",
                          "optim.optimizer=adamw"), progress="none")
    captured = capsys.readouterr()
    assert result.status == "finished"
    assert "iteration 1: gradient norm is nan; step skipped" in captured.out + captured.err
    assert sorted(losses(output)) == [1, 2, 3, 4] and all(np.isfinite(list(losses(output).values())))
    from GuidedSegLib.bundle import load_networks

    _, networks = load_networks(output / "bundle")
    assert all(torch.isfinite(p).all() for net in networks.values() for p in net.parameters())


def test_bf16_on_cpu_is_not_used_where_its_convolutions_give_wrong_gradients(phantom_store, cache, tmp_path):
    """PyTorch 2.13's bf16 CPU Conv3d returns garbage weight gradients for feature maps 2 voxels
    deep; a 16-deep patch through 3 poolings makes one, so the trainer trains in float32."""
    code, out, err = run_train(phantom_store, tmp_path / "run", cache, "optim.iterations=3", "optim.amp=on",
                               "data.patch=[16,32,32]", method="supervised")
    assert code == 0, err
    assert "warning: optim.amp=on ignored: patch [16, 32, 32] (z, y, x) leaves a feature map 2 voxels deep" in out
    assert "at least 24 along z" in out


# ----------------------------------------------------------------------------------------------
# refusals, each before any training step


def config(store: Path, output: Path, *overrides: str):
    return load_config(None, [f"store={store}", f"output={output}", "device=cpu", *TINY, *overrides])


def test_with_three_labeled_cases_every_case_trains_and_the_bundle_says_so(phantom_store, cache, tmp_path):
    """Below 10 labeled cases nothing is held out by default (a held-out case would be a third of
    three): all labeled cases train, the final weights are kept, and the bundle says both."""
    from GuidedSegLib.bundle import describe_bundle

    store = CaseStore(phantom_store)
    assert len(store.cases("labeled")) == 5 and len(store.splits().validation) == 1  # the store itself holds one out
    output = tmp_path / "run"
    code, out, err = run_train(phantom_store, output, cache, "optim.iterations=2", "validation.fraction=auto",
                               "validation.monitor=phantomTruth", method="supervised")
    assert code == 0, err
    # the curve comes from unlabeled cases' references (never from a held-out labeled case)
    with open(output / "monitor_validation.csv", newline="") as handle:
        monitored = list(csv.DictReader(handle))
    assert [r["iteration"] for r in monitored] == ["2"] and "volume_ratio_1" in monitored[0]
    assert not (output / "validation.csv").exists()
    training = json.loads((output / "bundle" / "model.json").read_text())["training"]
    assert sorted(training["labeled"]) == sorted(c.case_id for c in store.cases("labeled"))
    assert training["validation"] == {} and training["selection"].startswith("final weights")
    assert "weights    final weights: no validation case (all 5 labeled cases trained)" in describe_bundle(output / "bundle")
    held = tmp_path / "held"
    code, out, err = run_train(phantom_store, held, cache, "optim.iterations=2", "validation.fraction=0.2",
                               method="supervised")
    assert code == 0, err
    training = json.loads((held / "bundle" / "model.json").read_text())["training"]
    assert len(training["labeled"]) == 4 and len(training["validation"]) == 1
    assert training["selection"].startswith("best validation Dice")


def test_empty_store_is_refused(tmp_path):
    store = CaseStore.create(tmp_path / "empty", {1: "liver"})
    with pytest.raises(TrainingSetupError, match="store is empty"):
        train(config(store.root, tmp_path / "run"), progress="none")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_store_without_labeled_case_is_refused(tmp_path):
    store = CaseStore.create(tmp_path / "s", {1: "liver"})
    store.add_unlabeled(generate_phantom(1, size=(32, 32, 16)).image, "u1")
    with pytest.raises(TrainingSetupError, match="no labeled training case"):
        train(config(store.root, tmp_path / "run"), progress="none")


def test_labels_outside_the_label_set_are_refused(tmp_path):
    source = tmp_path / "plain"
    write_phantom_store(source, cases=3, labeled=3, test=0, seed=1, size=(48, 48, 24))
    data = json.loads((source / "dataset.json").read_text())
    data["labels"] = {"0": "background", "1": "liver"}  # the files hold 13 organs
    (source / "dataset.json").write_text(json.dumps(data))
    with pytest.raises(Exception, match=r"labelsTr.*label values \[2, 3.*not in the store's label set"):
        train(config(source, tmp_path / "run"), progress="none")


def test_unreadable_image_is_named(tmp_path):
    source = tmp_path / "s"
    store = write_phantom_store(source, cases=3, labeled=3, test=0, seed=1, size=(48, 48, 24))
    broken = store.cases("labeled")[0].image
    broken.write_bytes(b"not an image at all")
    with pytest.raises(Exception, match=broken.name):
        train(config(source, tmp_path / "run"), progress="none")


def test_config_typo_is_refused_by_the_command(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "Training" / "train.py"), "--output", str(tmp_path / "r"),
                             "optim.iteratons=5"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    assert "unknown setting 'optim.iteratons'; did you mean 'optim.iterations'?" in result.stderr
    assert not (tmp_path / "r").exists()
    result = subprocess.run([sys.executable, str(ROOT / "Training" / "train.py"), "--output", str(tmp_path / "r"),
                             "--store", str(tmp_path / "no-store")], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2 and "no-store: no such store folder" in result.stderr
    assert not (tmp_path / "r").exists(), "a refused run left its output folder behind"
    with pytest.raises(ConfigError, match="network.feature_layer 5 must be in 1..3"):
        load_config(None, ["network.widths=[4,8,16,32]", "network.feature_layer=5"])
    with pytest.raises(ConfigError, match="data.patch"):
        load_config(None, ["data.patch=[32,32]"])
    with pytest.raises(ConfigError, match="objective.gt_voxels 'every' must be annotated or marginal"):
        load_config(None, ["objective.gt_voxels=every"])
    with pytest.raises(ConfigError, match="network.deep_supervision 3 must be 'auto' or in 0..1"):
        load_config(None, ["network.widths=[4,8,16]", "network.feature_layer=2", "network.deep_supervision=3"])
    with pytest.raises(ConfigError, match="network.deep_supervision is a unet3d setting; dkuxnet trains uxnet-kmax"):
        load_config(None, ["method=dkuxnet", "network.deep_supervision=2"])


def test_a_learning_rate_in_exponent_form_is_a_number_and_a_word_is_refused():
    # YAML 1.1 reads 1e-4 (no dot) as a string: the command line and config files must still take it
    assert load_config(None, ["optim.lr=1e-4"]).optim.lr == 1e-4
    with pytest.raises(ConfigError, match="setting 'optim.lr' must be a number, not 'fast'"):
        load_config(None, ["optim.lr=fast"])
    with pytest.raises(ConfigError, match="setting 'optim.lr' must be a number, not nan"):
        load_config(None, ["optim.lr=nan"])


def test_a_run_saved_before_deep_supervision_existed_resumes_without_coarse_heads(tmp_path):
    import yaml

    from Training.config import resume_config

    saved = load_config(None, [f"output={tmp_path}", "network.deep_supervision=2"]).to_dict()
    del saved["network"]["deep_supervision"]  # as config.yaml was written before the setting existed
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    assert resume_config(tmp_path).network.deep_supervision == 0


def test_a_dkuxnet_run_saved_before_uxnet_deep_supervision_existed_resumes_without_coarse_heads(tmp_path):
    """New DK-UXNet runs get UX-Net deep supervision 2 by default; one saved before the key existed
    had none, and resuming it must not grow heads its checkpoint lacks."""
    import yaml

    from Training.config import resume_config

    assert load_config(None, ["method=dkuxnet"]).network.uxnet.deep_supervision == 2
    saved = load_config(None, [f"output={tmp_path}", "method=dkuxnet"]).to_dict()
    del saved["network"]["uxnet"]["deep_supervision"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    assert resume_config(tmp_path).network.uxnet.deep_supervision == 0


# ----------------------------------------------------------------------------------------------
# crops and mirroring


def _sided_case(tmp_path):
    """A 16^3 case whose left half (x >= 8 in LPI) holds a left organ (class 2) and whose right
    half is bright; class 1 is an unsided organ in the middle, class 3 its twin's right side."""
    from GuidedSegLib.training_data import PreparedCase

    image = np.zeros((16, 16, 16), np.float32)
    image[:, :, :8] = 1.0  # the patient's right half (x < 8 in LPI) is bright
    label = np.zeros((16, 16, 16), np.uint8)
    label[6:10, 6:10, 6:10] = 1
    label[4:12, 4:12, 10:14] = 2  # the left kidney
    label[4:12, 4:12, 2:5] = 3  # the right kidney
    np.save(tmp_path / "i.npy", image)
    np.save(tmp_path / "l.npy", label)
    annotated = np.array([True, True, True, False])  # the right kidney is not annotated in this case
    absent = np.array([False, False, False, False])
    locations = {k: np.argwhere(label == k).astype(np.int32) for k in (1, 2)}
    return PreparedCase("c", tmp_path / "i.npy", tmp_path / "l.npy", (16, 16, 16), 0.0, annotated, absent, locations)


def test_left_right_mirror_swaps_paired_labels_and_nothing_else(tmp_path):
    """A mirrored crop is the same anatomy seen in a mirror: the left kidney becomes the right
    kidney (and its annotated flag moves with it), the unsided organ keeps its label, and no
    crop is flipped head-to-foot or front-to-back by default."""
    from GuidedSegLib.preprocessing import PreprocessingPlan
    from GuidedSegLib.progress import Reporter
    from GuidedSegLib.training_data import CropSampler
    from Training.trainer import _augmentation

    case = _sided_case(tmp_path)
    store = CaseStore.create(tmp_path / "sided", {1: "liver", 2: "kidney_left", 3: "kidney_right"})
    quiet = Reporter("none")
    lpi = PreprocessingPlan(orientation="LPI")
    config = load_config(None, ["data.augment=false"])
    augmentation = _augmentation(config, store, [0, 1, 2, 3], lpi, quiet, 0)
    assert augmentation.mirror_axis == 2 and augmentation.permutation == (0, 1, 3, 2) and augmentation.flip_axes == ()
    assert _augmentation(config, store, [0, 1, 2, 3], PreprocessingPlan(orientation="PIL"), quiet, 0).mirror_axis == 0
    lonely = CaseStore.create(tmp_path / "lonely", {1: "liver", 2: "kidney_left"})
    assert _augmentation(config, lonely, [0, 1, 2], lpi, quiet, 0).mirror_axis is None  # no twin: no mirror

    sampler = CropSampler([case], [], (16, 16, 16), 2, 0, foreground=1.0, seed=3, augmentation=augmentation)
    original = torch.from_numpy(np.load(tmp_path / "l.npy").astype(np.int64))
    original[original == 3] = 0  # the unannotated right kidney reads as background (unknown)
    mirrored_seen = plain_seen = 0
    for iteration in range(30):
        batch = sampler.batch(iteration)
        assert torch.equal(batch["image"], sampler.batch(iteration)["image"])  # pure function of the iteration
        for crop, image, label, annotated in zip(sampler.plan(iteration), batch["image"], batch["labels"],
                                                  batch["annotated"]):
            assert crop.flips in ((), (2,))
            if crop.flips:
                mirrored_seen += 1
                expected = torch.tensor([0, 1, 3, 2])[original.flip(-1)]
                assert torch.equal(label, expected)
                assert (image[0, :, :, 8:] == 1).all() and (image[0, :, :, :8] == 0).all()
                assert annotated.tolist() == [True, True, False, True]  # the flag followed the kidney
            else:
                plain_seen += 1
                assert torch.equal(label, original) and annotated.tolist() == [True, True, True, False]
    assert mirrored_seen and plain_seen

    everything = _augmentation(load_config(None, ["data.augment=false", "data.mirror=all"]), store, [0, 1, 2, 3],
                               lpi, quiet, 0)
    assert everything.flip_axes == (0, 1) and everything.mirror_axis == 2
    never = _augmentation(load_config(None, ["data.mirror=none"]), store, [0, 1, 2, 3], lpi, quiet, 0)
    assert never.mirror_axis is None and never.flip_axes == ()


def test_spatial_and_intensity_augmentation_keep_labels_on_their_anatomy(tmp_path):
    """Rotated and zoomed crops move image and label together (the bright half stays labeled
    where it is bright), labels stay integer classes, and intensity changes leave labels alone."""
    from GuidedSegLib.training_data import Augmentation, CropSampler, PreparedCase

    image = np.zeros((24, 24, 24), np.float32)
    label = np.zeros((24, 24, 24), np.uint8)
    image[6:18, 6:18, 6:18] = 1.0
    label[6:18, 6:18, 6:18] = 1
    np.save(tmp_path / "i.npy", image)
    np.save(tmp_path / "l.npy", label)
    case = PreparedCase("c", tmp_path / "i.npy", tmp_path / "l.npy", (24, 24, 24), 0.0, np.ones(2, bool),
                        np.zeros(2, bool), {1: np.argwhere(label == 1).astype(np.int32)})
    sampler = CropSampler([case], [], (24, 24, 24), 1, 0, foreground=0.0, seed=0,
                          augmentation=Augmentation(spatial_p=1.0, intensity_p=0.0))
    for iteration in range(5):
        crop = sampler.plan(iteration)[0]
        assert crop.rotation is not None
        batch = sampler.batch(iteration)
        labels, img = batch["labels"][0], batch["image"][0, 0]
        assert set(labels.unique().tolist()) <= {0, 1}
        inside = img[labels == 1]
        assert inside.mean() > 0.9 and img[labels == 0].mean() < 0.1
        assert not torch.equal(labels, torch.from_numpy(label.astype(np.int64)))  # it did move
    bright = CropSampler([case], [], (24, 24, 24), 1, 0, foreground=0.0, seed=0,
                         augmentation=Augmentation(spatial_p=0.0, intensity_p=1.0))
    batch = bright.batch(0)
    assert torch.equal(batch["labels"][0], torch.from_numpy(label.astype(np.int64)))
    assert not torch.equal(batch["image"][0, 0], torch.from_numpy(image))