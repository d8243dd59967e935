"""``guidedseg evaluate``: scores checked by hand, unannotated pairs left out with n per organ, the
report files, and refusals that write nothing."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk

from GuidedSegLib.cli import main
from GuidedSegLib.errors import InputFileError
from GuidedSegLib.evaluation import evaluate_folders
from GuidedSegLib.imageio import write_label_map
from GuidedSegLib.store import CaseStore

SPACING = (2.0, 2.0, 3.0)


def volume(array: np.ndarray, path) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING)
    image.SetOrigin((10.0, -5.0, 7.5))
    sitk.WriteImage(image, str(path))


def cube(shift: int = 0, spleen: bool = True) -> np.ndarray:
    label = np.zeros((20, 30, 30), np.uint8)
    label[5:15, 5:15, 5 + shift:15 + shift] = 1  # liver: 10 x 10 x 10 voxels
    if spleen:
        label[5:10, 20:25, 20:25] = 2
    return label


@pytest.fixture
def folders(tmp_path):
    pred, ref, images = tmp_path / "pred", tmp_path / "ref", tmp_path / "images"
    for folder in (pred, ref, images):
        folder.mkdir()
    volume(cube(), ref / "a.nii.gz")
    volume(cube(shift=2), pred / "a.nii.gz")  # liver moved 2 voxels (4 mm) along x; spleen exact
    volume(cube(spleen=False), ref / "b.nii.gz")  # spleen not contoured in b's reference
    volume(cube(spleen=True), pred / "b.nii.gz")
    volume(np.random.default_rng(0).normal(0, 50, (20, 30, 30)).astype(np.int16), images / "a.nii.gz")
    return pred, ref, images


def test_scores_by_hand_and_unannotated_pairs_left_out(folders, tmp_path, capsys):
    pred, ref, images = folders
    labels = tmp_path / "dataset.json"
    labels.write_text('{"labels": {"0": "background", "1": "liver", "2": "spleen"}}')
    code = main(["evaluate", "--pred", str(pred), "--ref", str(ref), "--labels", str(labels), "--ref-labels",
                 str(labels), "--images", str(images), "--output", str(tmp_path / "report")])
    assert code == 0
    printed = capsys.readouterr().out
    with open(tmp_path / "report" / "metrics.csv", encoding="utf-8") as handle:
        rows = {(r["case"], r["organ"]): r for r in csv.DictReader(handle)}
    # Liver in a: overlap 8 x 10 x 10 of two 1000-voxel cubes.
    liver = rows[("a", "liver")]
    assert float(liver["dice"]) == pytest.approx(0.8) and float(liver["jaccard"]) == pytest.approx(800 / 1200)
    assert 0 < float(liver["hd95_mm"]) <= 4.0 + 1e-6 and 0 < float(liver["asd_mm"]) < 4.0
    assert float(rows[("a", "spleen")]["dice"]) == 1.0 and float(rows[("a", "spleen")]["hd95_mm"]) == 0.0
    # b's reference holds no spleen: that pair is left out, not scored as a false positive.
    assert ("b", "spleen") not in rows and float(rows[("b", "liver")]["dice"]) == 1.0
    assert "| liver | 2 |" in printed and "| spleen | 1 |" in printed
    report = tmp_path / "report"
    assert (report / "dice.png").stat().st_size > 1000
    assert (report / "summary.md").read_text(encoding="utf-8").count("| a |") == 1
    assert sorted(p.name for p in (report / "overlays").iterdir()) == ["a.png", "b.png"]


def test_a_stores_annotated_sets_decide_what_counts(folders, tmp_path):
    """A store's test case that records only the liver as annotated: its spleen is not scored,
    though the file holds one; the organs it checked and found absent are scored."""
    pred, ref, _ = folders
    store = CaseStore.create(tmp_path / "store", {1: "liver", 2: "spleen"})
    image = tmp_path / "img.nii.gz"
    volume(np.zeros((20, 30, 30), np.int16), image)
    store.add_test(image, ref / "a.nii.gz", "a", annotated=["liver"])
    store.add_test(image, ref / "b.nii.gz", "b", absent=["spleen"])
    # The predictions use the store's values: its dataset.json names them.
    report = evaluate_folders(pred, tmp_path / "store", tmp_path / "report", labels=tmp_path / "store", slices=0)
    scored = {(s.case, s.organ): s.dice for s in report.scores}
    assert set(scored) == {("a", "liver"), ("b", "liver"), ("b", "spleen")}
    assert scored[("b", "spleen")] == 0.0  # predicted where the annotator checked there is none
    assert report.summary()[2]["left_out"] == 1


def test_refusals_name_the_file_and_write_nothing(folders, tmp_path):
    pred, ref, _ = folders
    other = tmp_path / "other"
    other.mkdir()
    moved = sitk.ReadImage(str(pred / "a.nii.gz"))
    moved.SetOrigin((11.3, -5.0, 7.5))  # off by a fraction of a voxel
    sitk.WriteImage(moved, str(other / "a.nii.gz"))
    volume(cube(), other / "b.nii.gz")
    with pytest.raises(InputFileError, match="a.nii.gz") as error:
        evaluate_folders(other, ref, tmp_path / "r1", slices=0)
    assert "grid" in str(error.value) and not (tmp_path / "r1").exists()
    (pred / "b.nii.gz").unlink()
    with pytest.raises(InputFileError, match="no prediction for 1 reference case"):
        evaluate_folders(pred, ref, tmp_path / "r2", slices=0)
    (tmp_path / "r3").mkdir()
    with pytest.raises(InputFileError, match="already exists"):
        evaluate_folders(pred, ref, tmp_path / "r3", slices=0)
    outside = tmp_path / "outside"
    outside.mkdir()
    volume(cube() * 3, outside / "a.nii.gz")  # label value 3 is not in the label set
    labels = tmp_path / "labels.json"
    labels.write_text('{"labels": {"0": "background", "1": "liver", "2": "spleen"}}')
    with pytest.raises(InputFileError, match="3"):
        evaluate_folders(outside, ref / "a.nii.gz", tmp_path / "r4", labels=labels, ref_labels=labels, slices=0)
    assert not any((tmp_path / name).exists() for name in ("r1", "r2", "r4"))


def bundle_with_labels(folder, labels: dict[int, str]):
    """The part of a model bundle evaluate reads: model.json's label names."""
    folder.mkdir()
    names = {"0": "background", **{str(v): n for v, n in labels.items()}}
    (folder / "model.json").write_text(json.dumps({"labels": names}))
    return folder


def test_labels_are_matched_by_name_not_by_value(folders, tmp_path, capsys):
    """The store numbers spleen 1 and liver 2; the model (the predictions' values) liver 1 and
    spleen 2, and it also knows a pancreas the store lacks, while the store has a kidney the
    model does not segment. Each organ is scored against its namesake; the others are named."""
    pred, _, _ = folders
    store = CaseStore.create(tmp_path / "store", {1: "spleen", 2: "liver", 3: "kidney"})
    image = tmp_path / "img.nii.gz"
    volume(np.zeros((20, 30, 30), np.int16), image)
    ref = tmp_path / "ref-store-values"
    ref.mkdir()
    swapped = cube()
    swapped[cube() == 1], swapped[cube() == 2] = 2, 1  # the same organs in the store's numbering
    swapped[15:18, 0:3, 0:3] = 3
    volume(swapped, ref / "a.nii.gz")
    store.add_test(image, ref / "a.nii.gz", "a")
    model = bundle_with_labels(tmp_path / "bundle", {1: "Liver", 2: "spleen", 3: "pancreas"})
    (pred / "b.nii.gz").unlink()
    assert main(["evaluate", "--pred", str(pred), "--ref", str(tmp_path / "store"), "--labels", str(model),
                 "--output", str(tmp_path / "report"), "--slices", "0"]) == 0
    captured = capsys.readouterr()
    with open(tmp_path / "report" / "metrics.csv", encoding="utf-8") as handle:
        rows = {r["organ"]: r for r in csv.DictReader(handle)}
    assert set(rows) == {"liver", "spleen"}
    assert float(rows["liver"]["dice"]) == pytest.approx(0.8) and rows["liver"]["value"] == "2"  # the store's value
    assert float(rows["spleen"]["dice"]) == 1.0
    said = captured.err + captured.out
    assert "no prediction label of that name: kidney" in said and "not in the reference, ignored: pancreas" in said
    assert "kidney" in (tmp_path / "report" / "summary.md").read_text(encoding="utf-8")


def test_a_pairing_without_a_name_in_common_is_refused(folders, tmp_path):
    pred, ref, _ = folders
    store = CaseStore.create(tmp_path / "store", {1: "Brainstem", 2: "SpinalCord"})
    image = tmp_path / "img.nii.gz"
    volume(np.zeros((20, 30, 30), np.int16), image)
    store.add_test(image, ref / "a.nii.gz", "a")
    store.add_test(image, ref / "b.nii.gz", "b")
    model = bundle_with_labels(tmp_path / "bundle", {1: "liver", 2: "spleen"})
    with pytest.raises(InputFileError, match="no label name in common") as error:
        evaluate_folders(pred, tmp_path / "store", tmp_path / "r1", labels=model, slices=0)
    assert "a.nii.gz" in str(error.value) and "liver" in str(error.value) and "Brainstem" in str(error.value)
    # Plain label files carry no names: against a store that names its organs they are not paired by value.
    with pytest.raises(InputFileError, match="without label names.*--labels"):
        evaluate_folders(pred, tmp_path / "store", tmp_path / "r2", slices=0)
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()


def test_seg_nrrd_predictions_carry_their_own_names(folders, tmp_path):
    _, ref, _ = folders
    pred = tmp_path / "seg"
    pred.mkdir()
    for case in ("a", "b"):
        label = sitk.ReadImage(str(ref / f"{case}.nii.gz"))
        # the model numbered spleen 1 and liver 2; its segments say so by name
        swapped = sitk.GetArrayFromImage(label)
        swapped = np.where(swapped == 1, 2, np.where(swapped == 2, 1, 0)).astype(np.uint8)
        out = sitk.GetImageFromArray(swapped)
        out.CopyInformation(label)
        write_label_map(out, pred / f"{case}.seg.nrrd", {1: "spleen", 2: "liver"})
    labels = tmp_path / "dataset.json"
    labels.write_text('{"labels": {"0": "background", "1": "liver", "2": "spleen"}}')
    report = evaluate_folders(pred, ref, tmp_path / "report", ref_labels=labels, slices=0)
    assert {(s.case, s.organ): s.dice for s in report.scores} == {("a", "liver"): 1.0, ("a", "spleen"): 1.0,
                                                                   ("b", "liver"): 1.0}


def test_paired_and_neighbouring_organs_get_distinct_colours():
    """The two sides of a paired organ, and any two organs of FLARE22 or of OpenKBP, are told apart."""
    from itertools import combinations

    from GuidedSegLib.labels import FLARE22_LABELS, label_colour

    def apart(a, b):
        return float(np.linalg.norm(np.subtract(label_colour(a), label_colour(b))))

    for left, right in (("kidney_left", "kidney_right"), ("adrenal_gland_left", "adrenal_gland_right"),
                        ("LeftParotid", "RightParotid"), ("Parotid_L", "Parotid_R"), ("liver", "spleen")):
        assert apart(left, right) > 0.3, (left, right)
    openkbp = ["Brainstem", "SpinalCord", "RightParotid", "LeftParotid", "Esophagus", "Larynx", "Mandible"]
    for organs in (FLARE22_LABELS.values(), openkbp):
        closest = min(combinations(organs, 2), key=lambda pair: apart(*pair))
        assert apart(*closest) > 0.15, closest
