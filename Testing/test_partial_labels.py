"""Partial labels end to end (issue 8): an organ left out of most labels and recorded as
unannotated is still learned by the partial-aware trainer, and lost by the plain reading.

Store: coarse three-organ phantoms (liver, spleen, both kidneys as one; 24 x 24 x 16 voxels of
13.3 x 13.3 x 15 mm, so one crop holds the whole abdomen and a step is cheap). Of the 5 labeled
cases, 3 have the liver erased from their label (set to 0) and are recorded as annotated for the
spleen and kidney only; 2 keep every organ. The supervised method is trained twice with the same
seed, data and budget (250 steps, lr 0.2, no dropout): ``data.partial_labels=true`` (the erased
liver is unknown: marginal Dice/CE + exclusion) and ``false`` (plain: the erased liver is
background). Both bundles segment the store's 2 test cases; the score is the mean liver Dice.

Why the liver: on CPU budgets it is the organ this trainer learns reliably. Spleen and kidneys
share the liver's intensity and need position context: with every case fully annotated they
stayed at Dice 0.00 after 400 steps (crops 24 x 40 x 40, 8 x 8 x 10 mm), so they cannot tell the
two readings apart in a test's budget.

Measured (mean liver Dice on the 2 test cases, this store, 1 CPU thread), partial / plain:
seed 0: 0.740 / 0.000, seed 1: 0.714 / 0.000, seed 2: 0.730 / 0.000, seed 3: 0.808 / 0.000,
seed 4: 0.528 / 0.545, seed 5: 0.819 / 0.000.
The test runs seed 0 (bit-for-bit repeatable on CPU) and asserts partial >= FLOOR = 0.6 and
partial - plain >= MARGIN = 0.5. Seed 4 is the exception and is why this is one fixed seed and
not a claim about every run: with 5 training cases the plain network can tell the cases apart,
so "background" in 3 of them does not always wipe the liver out of the other 2, and then it
segments test livers too. With 8 labeled cases of which 3 keep the liver, partial / plain over
seeds 0-5 was 0.786/0.000, 0.695/0.000, 0.762/0.000, 0.597/0.000, 0.708/0.483, 0.828/0.000:
seed 4 again the exception.

Measured on the way there (same store layout): with only 1 of 4 cases keeping the liver, or at
lr 0.05-0.1 and 100-160 steps, the partial-aware run stayed in the all-background plateau for
some seeds (Dice 0.00 for both readings), so those settings would make a flaky test.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from GuidedSegLib.inference import Predictor
from GuidedSegLib.metrics import dice
from GuidedSegLib.phantoms import generate_phantom
from GuidedSegLib.store import CaseStore

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from Training.config import load_config
from Training.trainer import train

LIVER, SPLEEN, KIDNEY = 1, 2, 3
LABELED, KEEP, TEST = 5, 2, 2  # labeled cases, of which KEEP keep the liver; test cases
SIZE, SPACING = (24, 24, 16), (13.333, 13.333, 15.0)  # (x, y, z)
SEED, FLOOR, MARGIN = 0, 0.6, 0.5


@pytest.fixture(scope="module")
def single_thread():
    """One CPU thread: the runs are bit-for-bit repeatable and do not crowd a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def liver_mostly_unannotated(tmp_path_factory) -> tuple[Path, list[tuple[sitk.Image, np.ndarray]]]:
    """The store (no validation split: both runs keep their last weights) and the test cases
    (image, truth) with their full three-organ labels."""
    root = tmp_path_factory.mktemp("partial") / "store"
    store = CaseStore.create(root, {LIVER: "liver", SPLEEN: "spleen", KIDNEY: "kidney"}, validation_fraction=0.0)
    tests = []
    for i in range(LABELED + TEST):
        phantom = generate_phantom(700 + i, size=SIZE, spacing=SPACING)
        truth = sitk.GetArrayFromImage(_three_organs(phantom))
        assert (truth == LIVER).sum() > 200, f"phantom {700 + i} has almost no liver at this size"
        if i >= LABELED:
            tests.append((phantom.image, truth))
            continue
        annotated = [LIVER, SPLEEN, KIDNEY]
        if i >= KEEP:
            truth = np.where(truth == LIVER, 0, truth).astype(np.uint8)
            annotated = [SPLEEN, KIDNEY]
        label = sitk.GetImageFromArray(truth)
        label.CopyInformation(phantom.label)
        store.add_labeled(phantom.image, label, f"case_{i}", annotated=annotated)
    assert store.annotation_counts() == {LIVER: KEEP, SPLEEN: LABELED, KIDNEY: LABELED}
    assert len(store.splits().train) == LABELED
    return root, tests


def liver_dice(store: Path, tests, output: Path, cache: Path, partial: bool) -> float:
    config = load_config(None, [
        f"store={store}", f"output={output}", "device=cpu", "method=supervised", f"seed={SEED}",
        f"data.partial_labels={str(partial).lower()}", f"data.cache={cache}",
        "network.widths=[4,8,16,32]", "network.feature_layer=3", "network.dropout=0.0",
        "data.patch=[16,24,24]", "data.labeled_batch=2", "data.unlabeled_batch=0",
        "optim.iterations=250", "optim.optimizer=sgd", "optim.lr=0.2", "validation.every=100000",
        "checkpoint_every=100000", "data.augment=false", "data.mirror=all", "data.foreground=0.33"])
    result = train(config, progress="none")
    assert result.status == "finished" and result.bundle is not None
    predictor = Predictor(result.bundle)
    scores = [dice(sitk.GetArrayFromImage(predictor.segment(image)) == LIVER, truth == LIVER)
              for image, truth in tests]
    return float(np.mean(scores))


def test_partial_aware_training_keeps_an_organ_the_plain_loss_loses(liver_mostly_unannotated, single_thread,
                                                                    tmp_path):
    store, tests = liver_mostly_unannotated
    partial = liver_dice(store, tests, tmp_path / "partial", tmp_path / "cache", partial=True)
    plain = liver_dice(store, tests, tmp_path / "plain", tmp_path / "cache", partial=False)
    print(f"test liver Dice with the liver unannotated in {LABELED - KEEP} of {LABELED} labeled cases: "
          f"partial-aware {partial:.3f}, plain {plain:.3f}")
    assert partial >= FLOOR, f"partial-aware training lost the liver: test Dice {partial:.3f} < {FLOOR} (plain {plain:.3f})"
    assert partial - plain >= MARGIN, \
        f"plain reading kept the liver: partial-aware {partial:.3f} - plain {plain:.3f} < {MARGIN}"


def test_an_organ_no_training_case_annotates_is_left_out_with_a_warning(tmp_path, single_thread, capsys):
    """The 10 % OpenKBP split has no training case that contours the larynx: with partial labels
    nothing separates such an organ from background, and its channel took over 84 % of a volume.
    The trainer leaves it out of the network and the bundle, and says so."""
    from GuidedSegLib.bundle import describe_bundle, load_networks

    store = CaseStore.create(tmp_path / "store", {LIVER: "liver", SPLEEN: "spleen", KIDNEY: "kidney"},
                             validation_fraction=0.0)
    for i in range(2):
        phantom = generate_phantom(700 + i, size=SIZE, spacing=SPACING)
        store.add_labeled(phantom.image, _three_organs(phantom), f"case_{i}",
                          annotated=[LIVER, SPLEEN])  # the kidneys are drawn but nobody vouched for them
    config = load_config(None, [
        f"store={store.root}", f"output={tmp_path / 'run'}", "device=cpu", "method=supervised",
        "network.widths=[4,8,16,32]", "network.feature_layer=3", "data.patch=[16,24,24]",
        "data.labeled_batch=2", "optim.iterations=2", "validation.every=100000"])
    result = train(config, progress="none")  # no progress, but warnings still show
    assert result.status == "finished"
    assert "warning: kidney: annotated in none of the 2 labeled training cases" in capsys.readouterr().err
    metadata, networks = load_networks(result.bundle)
    assert metadata["labels"] == {"0": "background", "1": "liver", "2": "spleen"}
    assert metadata["training"]["not_trained"] == {"3": "kidney"}
    logits, _ = networks["A"](torch.zeros(1, 1, 16, 24, 24))
    assert logits.shape[1] == 3
    assert "not learned kidney (annotated in no training case)" in describe_bundle(result.bundle)


def _three_organs(phantom) -> sitk.Image:
    """The phantom's label reduced to liver, spleen and both kidneys as one."""
    merge = np.zeros(14, np.uint8)
    merge[[1, 3, 2, 13]] = [LIVER, SPLEEN, KIDNEY, KIDNEY]  # FLARE22 liver, spleen, kidneys
    label = sitk.GetImageFromArray(merge[sitk.GetArrayFromImage(phantom.label)])
    label.CopyInformation(phantom.label)
    return label
