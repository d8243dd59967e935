"""The case store: Decathlon layout MONAI reads, label versions with provenance, atomic writes
under a lock, annotated sets for partially labeled cases, stable splits, clear refusals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import SHARED_SETS, oblique_case, shared_set

from GuidedSegLib.errors import InputFileError, StoreError
from GuidedSegLib.imageio import read_image, write_image, write_label_map
from GuidedSegLib.store import DATASET_JSON, CaseStore

LABELS = {1: "liver", 2: "spleen", 3: "kidney_left", 4: "pancreas"}
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def case_files(tmp_path):
    """Two cases on disk: (image path, label path) each; labels hold values 1..3."""
    files = []
    for index in range(2):
        image, label = oblique_case(size=(40, 36, 12), seed=index)
        files.append((write_image(image, tmp_path / "in" / f"case{index}.nii.gz"),
                      write_label_map(label, tmp_path / "in" / f"case{index}_label.nii.gz")))
    return files


@pytest.fixture
def store(tmp_path):
    return CaseStore.create(tmp_path / "store", LABELS, modality="CT")


def array(path) -> np.ndarray:
    return sitk.GetArrayFromImage(read_image(path))


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
            and p.name != ".guidedseg.lock"}


def test_created_store_is_read_by_monai(store, case_files):
    from monai.data import load_decathlon_datalist

    (image0, label0), (image1, _) = case_files
    store.add_labeled(image0, label0, "a1", source="test")
    store.add_unlabeled(image1, "u1")
    store.add_test(image0, label0, "t1")
    dataset = store.root / DATASET_JSON
    training = load_decathlon_datalist(str(dataset), True, "training")
    unlabeled = load_decathlon_datalist(str(dataset), False, "unlabeled")
    test = load_decathlon_datalist(str(dataset), True, "test")
    assert [Path(d["image"]).name for d in training] == ["a1.nii.gz"]
    assert all(Path(d[k]).is_file() for d in training for k in ("image", "label"))
    assert Path(unlabeled[0]["image"]).is_file() and Path(test[0]["label"]).is_file()
    data = json.loads(dataset.read_text())
    assert data["numTraining"] == 1 and data["numTest"] == 1 and data["labels"]["0"] == "background"
    assert np.array_equal(array(store.case("a1").label), array(label0))


def test_ingesting_twice_keeps_every_version_with_provenance(store, case_files):
    (image0, label0), _ = case_files
    store.add_labeled(image0, label0, "c", source="expert")
    first = array(label0)
    second = first.copy()
    second[second == 3] = 0  # corrected: kidney removed
    third = first.copy()
    third[:, :5, :] = 0
    paths = []
    for index, corrected in enumerate((second, third)):
        image = sitk.GetImageFromArray(corrected)
        image.CopyInformation(read_image(label0))
        paths.append(write_label_map(image, store.root.parent / f"corrected{index}.nii.gz"))
    store.ingest_label("c", paths[0], source="slicer-panel", model="bundle-A")
    case = store.ingest_label("c", paths[1], source="slicer-panel", model="bundle-B")
    assert case.label_version == 3
    versions = store.history("c")
    assert [v["version"] for v in versions] == [1, 2, 3]
    assert [v["model"] for v in versions] == [None, "bundle-A", "bundle-B"]
    assert versions[1]["source"] == "slicer-panel" and versions[1]["time"]
    for record, expected in zip(versions, (first, second, third)):
        assert np.array_equal(array(store.root / record["label"]), expected)
    assert np.array_equal(array(case.label), third)
    assert store.verify() == []
    assert case.annotated == (1, 2, 3)  # default: organs present in the new label


def test_ingest_a_slicer_segmentation_by_segment_names(store, case_files):
    (image0, label0), _ = case_files
    store.add_unlabeled(image0, "u")
    label = read_image(label0)
    cropped = label[4:36, 3:30, 1:11]  # Slicer saves the segments' extent only
    seg = write_label_map(cropped, store.root.parent / "edit.seg.nrrd", {1: "Liver", 2: "spleen", 3: "Kidney Left"})
    case = store.ingest_label("u", seg, annotated=["liver", "spleen", "kidney_left"], absent=["pancreas"])
    assert case.kind == "labeled" and case.annotated == (1, 2, 3) and case.absent == (4,)
    expected = np.zeros_like(array(label0))
    expected[1:11, 3:30, 4:36] = array(label0)[1:11, 3:30, 4:36]
    assert np.array_equal(array(case.label), expected)
    assert not (store.root / "imagesUnlabeled" / "u.nii.gz").exists()  # promoted to imagesTr
    assert case.image == store.root / "imagesTr" / "u.nii.gz" and case.image.is_file()


def test_partial_annotation_is_recorded_and_counted(store, case_files):
    (image0, label0), (image1, label1) = case_files
    store.add_labeled(image0, label0, "full")
    store.add_labeled(image1, label1, "partial", annotated=["liver", "2"], absent=[4])
    assert store.annotated_labels("full") == (1, 2, 3)
    assert store.annotated_labels("partial") == (1, 2)
    assert store.case("partial").absent == (4,)
    assert store.annotation_counts() == {1: 2, 2: 2, 3: 1, 4: 0}
    with pytest.raises(InputFileError, match=r"organs \['liver'\] are marked absent but are present"):
        store.ingest_label("full", label0, absent=["liver"])
    with pytest.raises(InputFileError, match="'bladder' is not an organ of the store's label set"):
        store.ingest_label("full", label0, annotated=["bladder"])


def test_empty_label_needs_a_statement_of_what_was_checked(store, case_files):
    (image0, label0), _ = case_files
    empty = sitk.Image(read_image(label0))
    empty = empty * 0
    with pytest.raises(InputFileError, match="holds no organ"):
        store.add_labeled(image0, empty, "e")
    case = store.add_labeled(image0, empty, "e", absent=["pancreas"])
    assert case.annotated == () and case.absent == (4,)


def test_refusals_name_the_file_and_touch_nothing(store, case_files, tmp_path):
    (image0, label0), (image1, _) = case_files
    store.add_labeled(image0, label0, "c")
    before = snapshot(store.root)

    wrong_values = sitk.Cast(read_image(label0), sitk.sitkUInt8) * 3  # values 3, 6, 9
    bad_values = write_label_map(wrong_values, tmp_path / "values.nii.gz")
    other_grid = read_image(label0)
    other_grid.SetSpacing((1.0, 1.0, 1.0))
    bad_grid = write_label_map(other_grid, tmp_path / "grid.nii.gz")
    flat = tmp_path / "flat.nii.gz"
    sitk.WriteImage(sitk.Image([30, 30], sitk.sitkUInt8), str(flat))
    frames = tmp_path / "frames.nii.gz"
    sitk.WriteImage(sitk.JoinSeries([read_image(image0), read_image(image0)]), str(frames))
    nan_image = sitk.Cast(read_image(image1), sitk.sitkFloat32)
    nan_image[1, 1, 1] = float("nan")
    nan = tmp_path / "nan.nrrd"
    sitk.WriteImage(nan_image, str(nan))
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"\x1f\x8b not really gzip")

    cases = [
        (lambda: store.ingest_label("c", bad_values), r"values.nii.gz: label values \[6, 9\] are not in"),
        (lambda: store.ingest_label("c", bad_grid), "grid.nii.gz: does not lie on its image's grid"),
        (lambda: store.ingest_label("c", flat), "flat.nii.gz: is 2D"),
        (lambda: store.add_unlabeled(frames, "f"), "frames.nii.gz: is 4D"),
        (lambda: store.add_unlabeled(nan, "n"), "nan.nrrd: contains 1 NaN"),
        (lambda: store.add_unlabeled(garbage, "g"), "garbage.nii.gz: cannot be read"),
        (lambda: store.ingest_label("c", tmp_path / "missing.nii.gz"), "missing.nii.gz: no such file"),
        (lambda: store.ingest_label("nobody", label0), "has no case 'nobody'"),
        (lambda: store.add_labeled(image0, label0, "c"), "already has a case 'c'"),
        (lambda: store.add_unlabeled(image1, "bad id!"), "case id 'bad id!' must"),
    ]
    for call, message in cases:
        with pytest.raises((InputFileError, StoreError), match=message) as caught:
            call()
        assert "\n" not in str(caught.value)
        assert snapshot(store.root) == before, message


def test_a_crash_while_writing_dataset_json_leaves_the_previous_store(store, case_files, monkeypatch):
    (image0, label0), (image1, _) = case_files
    store.add_labeled(image0, label0, "c")
    before = (store.root / DATASET_JSON).read_bytes()
    real_replace = os.replace

    def crash_on_dataset_json(src, dst):
        if str(dst).endswith(DATASET_JSON):
            raise KeyboardInterrupt("power cut")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_dataset_json)
    with pytest.raises(KeyboardInterrupt):
        store.add_unlabeled(image1, "u")
    with pytest.raises(KeyboardInterrupt):
        store.ingest_label("c", label0, source="again")
    monkeypatch.setattr(os, "replace", real_replace)
    assert (store.root / DATASET_JSON).read_bytes() == before
    reopened = CaseStore(store.root)
    assert [c.case_id for c in reopened.cases()] == ["c"] and reopened.verify() == []
    assert not list(store.root.glob(".tmp-*"))
    # the orphan image of the interrupted add does not block adding the case again
    assert reopened.add_unlabeled(image1, "u").image.is_file()


WRITER = textwrap.dedent("""
    import sys
    from GuidedSegLib.store import CaseStore
    store = CaseStore(sys.argv[1])
    for i in range(int(sys.argv[4])):
        store.ingest_label(sys.argv[2], sys.argv[3], source=f"writer-{i}")
""")


def test_killed_writers_never_corrupt_the_store(store, case_files):
    """SIGKILL a process in the middle of a stream of ingests, several times: the store must
    always open, refer only to complete files, and keep every committed version."""
    (image0, label0), _ = case_files
    store.add_labeled(image0, label0, "c")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for delay in (0.9, 1.3, 1.7):
        process = subprocess.Popen([sys.executable, "-c", WRITER, str(store.root), "c", str(label0), "1000"], env=env)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
        reopened = CaseStore(store.root)
        assert reopened.verify() == []
        versions = reopened.history("c")
        assert [v["version"] for v in versions] == list(range(1, len(versions) + 1))
    assert len(CaseStore(store.root).history("c")) > 3  # the writers did commit versions


def test_concurrent_writers_lose_no_update(store, case_files):
    (image0, _), _ = case_files
    script = textwrap.dedent("""
        import sys
        from GuidedSegLib.store import CaseStore
        store = CaseStore(sys.argv[1])
        for i in range(4):
            store.add_unlabeled(sys.argv[2], f"{sys.argv[3]}{i}")
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    processes = [subprocess.Popen([sys.executable, "-c", script, str(store.root), str(image0), prefix], env=env)
                 for prefix in ("p", "q")]
    assert [p.wait() for p in processes] == [0, 0]
    assert sorted(c.case_id for c in CaseStore(store.root).cases("unlabeled")) == \
        ["p0", "p1", "p2", "p3", "q0", "q1", "q2", "q3"]


def test_splits_are_stable_as_cases_arrive(store, case_files):
    (image0, label0), _ = case_files
    label = read_image(label0)
    seen_train: set[str] = set()
    for index in range(24):
        store.add_labeled(image0, label, f"case{index:02d}")
        splits = store.splits()
        assert not seen_train & set(splits.validation), "a training case moved into validation"
        seen_train |= set(splits.train)
        assert set(splits.train).isdisjoint(splits.validation)
    assert store.splits() == CaseStore(store.root).splits()  # deterministic
    assert 2 <= len(store.splits().validation) <= 10
    store.add_test(image0, label0, "held-out")
    assert "held-out" not in store.splits().train + store.splits().validation


def test_a_folder_without_a_store_or_with_broken_json_is_refused(tmp_path):
    with pytest.raises(StoreError, match="is not a case store: no dataset.json"):
        CaseStore(tmp_path)
    (tmp_path / DATASET_JSON).write_text("{ not json")
    with pytest.raises(StoreError, match="dataset.json: cannot be read as JSON"):
        CaseStore(tmp_path)
    with pytest.raises(StoreError, match="already holds a dataset.json"):
        CaseStore.create(tmp_path, LABELS)


@pytest.mark.shared_data
@pytest.mark.parametrize("name", SHARED_SETS)
def test_every_shared_data_set_opens_as_a_store(name):
    store = CaseStore(shared_set(name))
    labeled, test = store.cases("labeled"), store.cases("test")
    assert labeled and test
    assert all(c.image.is_file() and c.label.is_file() for c in labeled + test)
    splits = store.splits()
    assert sorted(splits.train + splits.validation) == sorted(c.case_id for c in labeled)
    assert store.verify() == []


@pytest.mark.shared_data
def test_openkbp_reports_its_partially_contoured_organs():
    store = CaseStore(shared_set("openkbp-hn-ct"))
    counts = {store.labels[v]: n for v, n in store.annotation_counts().items()}
    assert counts["Esophagus"] == 8 and counts["Larynx"] == 14 and counts["Mandible"] == 17


def test_in_memory_labels_get_the_same_checks_as_files(store, case_files):
    (image0, label0), _ = case_files
    negative = sitk.Cast(read_image(label0), sitk.sitkInt16) - 1  # background becomes -1
    with pytest.raises(InputFileError, match="<label in memory>: holds negative label value -1"):
        store.add_labeled(image0, negative, "m")
    assert store.cases() == []
