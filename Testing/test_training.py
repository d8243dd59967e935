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

from GuidedSegLib.phantoms import generate_phantom, write_phantom_store
from GuidedSegLib.store import CaseStore

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from Training.config import ConfigError, load_config
from Training.trainer import TrainingSetupError, train

TINY = ["network.widths=[4,8,16,32]", "network.feature_layer=3", "data.patch=[32,32,32]", "data.labeled_batch=2",
        "data.unlabeled_batch=2", "validation.every=1000", "checkpoint_every=1000"]


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
    # optim.amp=on: bf16 autocast and channels-last on CPU too (the YAML "on" is read as text)
    code, out, err = run_train(phantom_store, output, cache, "optim.iterations=2", "optim.amp=on", method="cps")
    assert code == 0, err
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


# ----------------------------------------------------------------------------------------------
# crops and mirroring


def test_crops_are_a_function_of_the_iteration_and_never_mirror_left_and_right(tmp_path):
    """A left kidney stays on the left of every crop once the trainer has seen a sided name;
    without sided names all three axes are mirrored."""
    from GuidedSegLib.preprocessing import PreprocessingPlan
    from GuidedSegLib.progress import Reporter
    from GuidedSegLib.training_data import CropSampler, PreparedCase
    from Training.trainer import _flip_axes

    image = np.zeros((16, 16, 16), np.float32)
    image[:, :, :8] = 1.0  # the patient's right half (x < 8 in LPI) is bright
    label = np.zeros((16, 16, 16), np.uint8)
    label[4:12, 4:12, 10:14] = 1  # an organ on the left
    np.save(tmp_path / "i.npy", image)
    np.save(tmp_path / "l.npy", label)
    case = PreparedCase("c", tmp_path / "i.npy", tmp_path / "l.npy", (16, 16, 16), 0.0, np.ones(2, bool),
                        np.zeros(2, bool), {1: np.argwhere(label == 1).astype(np.int32)})
    sided = CaseStore.create(tmp_path / "sided", {1: "kidney_left"})
    plain = CaseStore.create(tmp_path / "plain", {1: "liver"})
    quiet = Reporter("none")
    lpi = PreprocessingPlan(orientation="LPI")
    assert _flip_axes(sided, [0, 1], lpi, quiet, 0) == (0, 1)  # LPI: x, the last array axis, is left-right
    assert _flip_axes(sided, [0, 1], PreprocessingPlan(orientation="PIL"), quiet, 0) == (1, 2)
    assert _flip_axes(plain, [0, 1], lpi, quiet, 0) == (0, 1, 2)

    sampler = CropSampler([case], [], (16, 16, 16), 2, 0, foreground=1.0, seed=3, flip_axes=(0, 1))
    for iteration in range(40):
        batch = sampler.batch(iteration)
        assert torch.equal(batch["image"], sampler.batch(iteration)["image"])  # pure function of the iteration
        assert batch["labels"][:, :, :, 10:14].sum() == batch["labels"].sum() > 0
        assert (batch["image"][:, 0, :, :, :8] == 1).all() and (batch["image"][:, 0, :, :, 8:] == 0).all()
    mirrored = CropSampler([case], [], (16, 16, 16), 2, 0, foreground=1.0, seed=3)
    assert any(2 in flips for it in range(40) for _, _, _, flips in mirrored.plan(it))
