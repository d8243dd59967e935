"""The annotation loop on phantoms (CPU, tiny networks): a warm start from a bundle, the ranking of
unlabeled cases (``guidedseg suggest``), the offline bundle import, and the bad inputs each
refused with one clear error and nothing written."""

from __future__ import annotations

import csv
import fcntl
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import THREE_ORGANS, three_organ_phantom

from GuidedSegLib import cli
from GuidedSegLib.lineage import bundle_hash, bundle_id
from GuidedSegLib.store import LOCK_FILE, CaseStore

pytest.importorskip("torch")
ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "Training" / "train.py"


def train(*args, cwd=ROOT):
    command = [sys.executable, str(TRAIN), "--device", "cpu", "--progress", "none", *map(str, args)]
    return subprocess.run(command, capture_output=True, encoding="utf-8", cwd=cwd, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


def hard_phantom(seed: int) -> sitk.Image:
    """A phantom made hard on purpose: its organs displaced (the anatomy shifted by 5-10 voxels)
    and heavy noise (SD 400 HU, against organs 20-60 HU apart)."""
    image, _ = three_organ_phantom(seed)
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    array = np.roll(array, (5, 10, -10), axis=(0, 1, 2)) + np.random.default_rng(seed).normal(0, 400, array.shape)
    out = sitk.GetImageFromArray(np.clip(array, -1024, 3000).astype(np.int16))
    out.CopyInformation(image)
    return out


@pytest.fixture(scope="module")
def store_now(three_organ_store, tmp_path_factory) -> Path:
    """The three-organ store after a round of corrections: case_4 (unlabeled) got its first label,
    case_0 a second label version."""
    root = tmp_path_factory.mktemp("loop") / "store"
    shutil.copytree(three_organ_store, root)
    store = CaseStore(root)
    _, label4 = three_organ_phantom(704)
    store.ingest_label("case_4", label4, source="simulated annotator (test)")
    _, label0 = three_organ_phantom(700)
    store.ingest_label("case_0", label0, source="corrected (test)")
    return root


@pytest.fixture(scope="module")
def finetuned(tiny_bundle, store_now, tmp_path_factory):
    """GuidedNet fine-tuned from the supervised tiny bundle for 30 steps."""
    output = tmp_path_factory.mktemp("ft") / "run-ft"
    before = bundle_hash(tiny_bundle)
    done = train("--init-from", tiny_bundle, "--store", store_now, "--output", output, "--method", "guidednet",
                 "optim.iterations=30", "validation.every=15")
    assert done.returncode == 0, done.stderr
    assert bundle_hash(tiny_bundle) == before  # the parent is never touched
    return output, done


def test_a_fine_tuned_bundle_starts_from_its_parent_and_records_its_lineage_and_data(finetuned, tiny_bundle):
    output, done = finetuned
    parent = json.loads((tiny_bundle / "model.json").read_text())
    child = json.loads((output / "bundle" / "model.json").read_text())
    rows = list(csv.DictReader(open(output / "validation.csv")))
    start = float(rows[0]["mean_dice"])
    assert rows[0]["iteration"] == "0"
    # the first validation is the parent's own score, not a fresh network's (near zero)
    assert parent["validation"]["mean_dice"] > 0.2
    assert abs(start - parent["validation"]["mean_dice"]) < 0.01, (start, parent["validation"])
    assert child["validation"]["mean_dice"] >= start - 1e-9  # never ends below where it started
    assert "B starts from network A" in done.stderr  # the one-network parent: said
    assert child["warm_start"]["networks"] == {"A": "A", "B": "A"}
    # lineage: the parent by id, path and metrics; the chain ends with it
    assert child["parent"]["id"] == bundle_id(tiny_bundle) and child["parent"]["path"] == str(tiny_bundle.resolve())
    assert child["lineage"][-1] == child["parent"] and child["name"].endswith("-v2")
    assert child["parent"]["validation"]["mean_dice"] == round(parent["validation"]["mean_dice"], 4)
    # the data it saw, with label versions: case_0 at version 2, case_4 newly labeled
    cases = {c["case"]: c for c in child["training"]["cases"]}
    assert cases["case_0"]["label_version"] == 2 and cases["case_0"]["source"] == "corrected (test)"
    assert cases["case_4"]["label_version"] == 1 and cases["case_4"]["split"] == "train"
    assert cases["case_1"]["split"] == "validation" and all(len(c["sha256"] or "") == 64 for c in cases.values())
    # the parent's preprocessing and labels are kept
    assert child["preprocessing"] == parent["preprocessing"] and child["labels"] == parent["labels"]
    # history: two versions, with their Dice
    history = cli_output(["bundle", "history", str(output / "bundle")])
    assert len(history.splitlines()) == 3 and bundle_id(tiny_bundle) in history


def test_a_bundle_made_before_deep_supervision_fine_tunes_without_coarse_heads(tiny_bundle, store_now, tmp_path):
    from safetensors.torch import load_file, save_file

    old = tmp_path / "old-bundle"
    shutil.copytree(tiny_bundle, old)
    model = json.loads((old / "model.json").read_text())
    assert model["network"]["deep_supervision"] > 0  # the default trains coarse heads
    del model["network"]["deep_supervision"]
    del model["training"]["config"]["network"]["deep_supervision"]
    (old / "model.json").write_text(json.dumps(model))
    weights = load_file(str(old / "weights.safetensors"))
    save_file({k: v for k, v in weights.items() if ".deep_heads." not in k}, str(old / "weights.safetensors"),
              metadata={"guidedseg_format": str(model["format"])})
    done = train("--init-from", old, "--store", store_now, "--output", tmp_path / "ft", "optim.iterations=2")
    assert done.returncode == 0, done.stderr
    child = json.loads((tmp_path / "ft" / "bundle" / "model.json").read_text())
    assert child["network"]["deep_supervision"] == 0


def test_an_organ_the_parent_never_learned_grows_the_head_once_a_labeled_case_annotates_it(tmp_path):
    """Round 0's cases annotate no kidney, so the parent has no kidney channel; once a corrected
    case annotates it, the warm start adds the channel and keeps every other class's weights."""
    from safetensors.torch import load_file

    store = CaseStore.create(tmp_path / "store", THREE_ORGANS)
    for i in range(2):
        store.add_labeled(*three_organ_phantom(740 + i), f"c{i}", annotated=["liver", "spleen"])
    tiny = ["network.widths=[4,8,16,32]", "network.feature_layer=3", "data.patch=[32,48,48]",
            "validation.fraction=0", "checkpoint_every=1000", f"data.cache={tmp_path / 'cache'}"]
    done = train("--store", store.root, "--output", tmp_path / "parent", "--method", "supervised",
                 "optim.iterations=3", *tiny)
    assert done.returncode == 0, done.stderr
    parent = json.loads((tmp_path / "parent" / "bundle" / "model.json").read_text())
    assert parent["training"]["not_trained"] == {"3": "kidney"} and "3" not in parent["labels"]

    store.ingest_label("c1", three_organ_phantom(741)[1], source="corrected (test)")  # now with the kidney
    done = train("--init-from", tmp_path / "parent" / "bundle", "--store", store.root, "--output", tmp_path / "child",
                 "--method", "supervised", "optim.iterations=2", "optim.lr=1e-12", *tiny)
    assert done.returncode == 0, done.stderr
    assert "the head grows by kidney (annotated in 1 labeled case, never by the parent's)" in done.stdout + done.stderr
    child = json.loads((tmp_path / "child" / "bundle" / "model.json").read_text())
    assert [int(v) for v in child["labels"]] == [0, 1, 2, 3] and not child["training"]["not_trained"]
    before = load_file(str(tmp_path / "parent" / "bundle" / "weights.safetensors"))
    after = load_file(str(tmp_path / "child" / "bundle" / "weights.safetensors"))
    heads = [k for k in before if before[k].shape[0] == 3 and ("head" in k)]
    assert heads and all(after[k].shape[0] == 4 for k in heads)
    for key in heads:  # lr 1e-12: no step moves a weight
        old, new = before[key].numpy(), after[key].numpy()
        assert np.allclose(new[1:3], old[1:3], atol=1e-6), key  # liver and spleen keep the parent's weights
        # the kidney starts as background, sharing its probability: both biases drop by log 2
        shift = np.log(2) if key.endswith("bias") else 0.0
        assert np.allclose(new[0], old[0] - shift, atol=1e-6) and np.allclose(new[3], new[0], atol=1e-6), key
    assert all(np.allclose(after[k].numpy(), before[k].numpy(), atol=1e-6) for k in before if k not in heads)


def cli_output(argv, capsys=None) -> str:
    done = subprocess.run([sys.executable, "-m", "GuidedSegLib.cli", *argv], capture_output=True,
                          encoding="utf-8", cwd=ROOT, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_fine_tuning_again_makes_a_new_version_beside_the_old_one(finetuned, store_now):
    output, _ = finetuned
    done = train("--init-from", output / "bundle", "--store", store_now, "--method", "supervised",
                 "optim.iterations=2", "validation.every=2")
    assert done.returncode == 0, done.stderr
    new = output.parent / "run-ft-ft1"  # beside the parent's run, under a new name
    child = json.loads((new / "bundle" / "model.json").read_text())
    assert [r["id"] for r in child["lineage"]] == [json.loads((output / "bundle" / "model.json").read_text())
                                                  ["parent"]["id"], bundle_id(output / "bundle")]
    assert child["warm_start"]["networks"] == {"A": "A"}


def test_labels_that_differ_or_a_newer_bundle_are_refused_before_training(tiny_bundle, tmp_path):
    other = CaseStore.create(tmp_path / "other", {1: "liver", 2: "spleen", 3: "pancreas"})
    image, label = three_organ_phantom(720)
    other.add_labeled(image, label, "c0")
    other.add_labeled(*three_organ_phantom(721), "c1")
    before = snapshot(other.root)
    done = train("--init-from", tiny_bundle, "--store", other.root, "--output", tmp_path / "out")
    assert done.returncode == 2
    assert "labels {0: background, 1: liver, 2: spleen, 3: kidney} differ from the store's" in done.stderr
    assert "3: pancreas" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists() and snapshot(other.root) == before

    newer = tmp_path / "newer"
    shutil.copytree(tiny_bundle, newer)
    metadata = json.loads((newer / "model.json").read_text())
    (newer / "model.json").write_text(json.dumps({**metadata, "format": 99}))
    done = train("--init-from", newer, "--store", other.root, "--output", tmp_path / "out")
    assert done.returncode == 2 and "bundle format 99, newer than this GuidedSeg reads" in done.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "newer-ft1").exists()


# ----------------------------------------------------------------------------------------------
# ranking


@pytest.fixture
def pool(tmp_path) -> Path:
    """A store whose unlabeled pool holds an easy phantom and a deliberately hard one."""
    store = CaseStore.create(tmp_path / "pool", THREE_ORGANS)
    image, label = three_organ_phantom(730)
    store.add_labeled(image, label, "seen")
    store.add_unlabeled(three_organ_phantom(731)[0], "a_easy")
    store.add_unlabeled(hard_phantom(732), "b_hard")
    return store.root


def test_a_hard_phantom_ranks_above_an_easy_one_and_a_second_run_reuses_the_cache(tiny_bundle, pool, capsys,
                                                                                 monkeypatch):
    from GuidedSegLib import suggest

    assert cli.main(["suggest", "--model", str(tiny_bundle), "--store", str(pool), "--strategy", "entropy",
                     "--progress", "none"]) == 0
    out = capsys.readouterr().out
    ranking = json.loads((pool / "suggestions.json").read_text())
    assert [r["case"] for r in ranking["ranking"]] == ["b_hard", "a_easy"], ranking
    assert ranking["ranking"][0]["score"] > ranking["ranking"][1]["score"]
    assert out.splitlines()[0].split() == ["rank", "case", "score", "liver", "spleen", "kidney"]
    assert "2 run through the networks" in out and "mean over organs" in out

    # the second run with the same bundle and images: no network runs at all
    calls = []
    monkeypatch.setattr(suggest.CaseScorer, "infer", lambda self, path: calls.append(path))
    again = suggest.suggest(tiny_bundle, pool, "entropy")
    assert calls == [] and again.inferred == 0 and all(item.cached for item in again.items)
    assert [s.case_id for s in again.items] == ["b_hard", "a_easy"]
    # a changed image is scored again (its file hash is part of the key), the other is not
    shutil.copyfile(pool / "imagesUnlabeled" / "b_hard.nii.gz", pool / "imagesUnlabeled" / "a_easy.nii.gz")
    monkeypatch.setattr(suggest.CaseScorer, "infer", lambda self, path: calls.append(path) or
                        {"disagreement": {}, "entropy": {1: 0.0, 2: 0.0, 3: 0.0}})
    suggest.suggest(tiny_bundle, pool, "entropy")
    assert [p.name for p in calls] == ["a_easy.nii.gz"]


def test_disagreement_needs_two_networks_and_says_so_otherwise(tiny_bundle, finetuned, pool, capsys):
    from GuidedSegLib import suggest

    ranking = suggest.suggest(tiny_bundle, pool, "disagreement")
    assert ranking.strategy == "entropy" and "no second network" in ranking.note
    output, _ = finetuned
    two = suggest.suggest(output / "bundle", pool, "disagreement")
    assert two.strategy == "disagreement" and two.inferred == 2
    assert all(0.0 <= s <= 1.0 for item in two.items for s in item.organs.values())
    assert any(s > 0 for item in two.items for s in item.organs.values())  # B was perturbed: A and B differ


def test_a_guidednet_bundle_keeps_its_mixture_and_ranks_by_the_cgmm_posterior(tiny_bundle, finetuned, three_organ_store,
                                                                              pool, tmp_path):
    import torch

    from GuidedSegLib import suggest
    from GuidedSegLib.cgmm import log_posterior, read_mixtures
    from GuidedSegLib.inference import Predictor
    from GuidedSegLib.preprocessing import preprocess

    output = tmp_path / "gn"
    done = train("--store", three_organ_store, "--output", output, "--method", "guidednet", "network.widths=[4,8,16,32]",
                 "network.feature_layer=3", "data.patch=[32,48,48]", "optim.iterations=20", "validation.fraction=0",
                 f"data.cache={tmp_path / 'cache'}")
    assert done.returncode == 0, done.stderr
    bundle = output / "bundle"
    mixtures = read_mixtures(bundle)
    assert sorted(mixtures) == ["A", "B"] and all(bool(m.present.all()) for m in mixtures.values())
    # the kept mixture gives a posterior over the classes at every voxel of a scan
    predictor = Predictor(bundle, "cpu")
    prepared = preprocess(three_organ_phantom(705)[0], predictor.plan)
    volume = torch.from_numpy(sitk.GetArrayFromImage(prepared.image))[None, None, :32, :48, :48]
    with torch.no_grad():
        _, features = predictor.networks[0](volume.float())
    g = log_posterior(features, mixtures["A"]).exp()
    assert g.shape[1] == 4 and torch.allclose(g.sum(1), torch.ones(()), atol=1e-4)

    ranking = suggest.suggest(bundle, pool, "cgmm")
    assert ranking.strategy == "cgmm" and ranking.note == "" and ranking.inferred == 2
    assert all(0.0 <= s <= 1.0 for item in ranking.items for s in item.organs.values())
    assert any(s > 0 for item in ranking.items for s in item.organs.values())
    cached = json.loads(next((pool / suggest.CACHE_FOLDER).rglob("b_hard.json")).read_text())
    assert set(cached) >= {"disagreement", "entropy", "cgmm"}
    # a warm start from it keeps the mixture: the child's first steps (and its bundle, were its
    # best weights the parent's) have the parent's class statistics
    child = train("--init-from", bundle, "--store", three_organ_store, "--output", tmp_path / "gn-ft",
                  "optim.iterations=2", "validation.fraction=0", f"data.cache={tmp_path / 'cache'}")
    assert child.returncode == 0, child.stderr
    assert "networks A, B keep the parent's CGMM mixture statistics" in child.stderr
    assert sorted(read_mixtures(tmp_path / "gn-ft" / "bundle")) == ["A", "B"]
    # bundles without a mixture fall back, and say so: supervised, and a fine-tune whose best
    # weights are its parent's (a supervised parent: no mixture yet)
    assert suggest.suggest(tiny_bundle, pool, "cgmm").strategy == "entropy"
    fallback = suggest.suggest(finetuned[0] / "bundle", pool, "cgmm")
    if read_mixtures(finetuned[0] / "bundle"):
        assert fallback.strategy == "cgmm"
    else:
        assert fallback.strategy == "disagreement" and "keeps no CGMM mixture" in fallback.note


def test_random_with_a_seed_is_reproducible_and_skip_drops_a_case_down_not_out(pool):
    from GuidedSegLib import suggest

    store = CaseStore(pool)
    for i in range(5):
        store.add_unlabeled(three_organ_phantom(740 + i)[0], f"extra_{i}")
    other = [s.case_id for s in suggest.suggest(None, pool, "random", seed=8).items]
    first = [s.case_id for s in suggest.suggest(None, pool, "random", seed=7).items]
    assert other != first
    assert [s.case_id for s in suggest.suggest(None, pool, "random", seed=7).items] == first
    assert sorted(first) == sorted(c.case_id for c in store.cases("unlabeled"))

    queue = suggest.skip_case(pool, first[0])
    assert [e["case"] for e in queue] == first[1:] + [first[0]]  # down, not out
    again = [s.case_id for s in suggest.suggest(None, pool, "random", seed=7).items]
    assert again == first[1:] + [first[0]]  # a new ranking keeps the skip
    store.ingest_label(first[1], three_organ_phantom(740)[1])  # a labeled case leaves the queue
    assert [e["case"] for e in suggest.queue(CaseStore(pool))] == first[2:] + [first[0]]


def test_an_empty_pool_or_a_locked_store_is_one_clear_error_with_nothing_written(tiny_bundle, tmp_path, pool, capsys):
    empty = CaseStore.create(tmp_path / "empty", THREE_ORGANS)
    empty.add_labeled(*three_organ_phantom(750), "only")
    before = snapshot(empty.root)
    assert cli.main(["suggest", "--model", str(tiny_bundle), "--store", str(empty.root)]) == 2
    err = capsys.readouterr().err
    assert "has no unlabeled case to rank" in err and len(err.strip().splitlines()) == 1
    assert snapshot(empty.root) == before

    before = snapshot(pool)
    with open(pool / LOCK_FILE, "a+b") as handle:  # another writer holds the store's lock
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        assert cli.main(["suggest", "--model", str(tiny_bundle), "--store", str(pool)]) == 2
    err = capsys.readouterr().err
    assert "is locked by another writer" in err and len(err.strip().splitlines()) == 1
    assert snapshot(pool) == before  # no ranking, no cache


# ----------------------------------------------------------------------------------------------
# import


def test_bundle_import_checks_before_listing_and_refuses_pickles_escapes_and_newer_formats(tiny_bundle, tmp_path,
                                                                                          capsys):
    models = tmp_path / "models"
    good = tmp_path / "three.zip"
    with zipfile.ZipFile(good, "w") as z:
        for f in tiny_bundle.iterdir():
            z.write(f, f"three/{f.name}")
    assert cli.main(["bundle", "import", str(good), "--models", str(models)]) == 0
    assert cli.main(["bundle", "import", str(good), "--models", str(models)]) == 0
    assert sorted(p.name for p in models.iterdir()) == ["three", "three-2"]  # never over an existing one
    capsys.readouterr()

    def refused(name, members, expected):
        archive = tmp_path / name
        with zipfile.ZipFile(archive, "w") as z:
            for member, data in members.items():
                z.writestr(member, data)
        before = snapshot(models)
        assert cli.main(["bundle", "import", str(archive), "--models", str(models)]) == 2
        err = capsys.readouterr().err
        assert expected in err and len(err.strip().splitlines()) == 1, err
        assert snapshot(models) == before

    files = {f"b/{f.name}": f.read_bytes() for f in tiny_bundle.iterdir()}
    import pickle

    refused("pickle.zip", {**files, "b/checkpoint.pt": pickle.dumps({"x": 1})}, "'b/checkpoint.pt', which a model "
            "bundle never holds")
    refused("escape.zip", {**files, "../evil/model.json": b"{}"}, "a path outside itself ('../evil/model.json')")
    refused("absolute.zip", {**files, "/tmp/evil.txt": b"x"}, "a path outside itself")
    metadata = json.loads((tiny_bundle / "model.json").read_text())
    refused("newer.zip", {**files, "b/model.json": json.dumps({**metadata, "format": 7})},
            "bundle format 7, newer than this GuidedSeg reads")
    assert not (tmp_path / "evil").exists()
