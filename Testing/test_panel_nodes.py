"""The panel's node <-> file logic and export, against Slicer's real MRML libraries (slicer-core):
geometry survives the trip to a file and back, a label map becomes named, coloured, coded
segments, and an export records exactly what the annotator edited or ticked, or refuses and
writes nothing."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import oblique_case

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "GuidedSeg"))

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the 'slicer' module here is not slicer-core", allow_module_level=True)

from GuidedSegPanel import export, nodes
from GuidedSegPanel.parameters import PanelParameters, parameter_node

from GuidedSegLib.errors import InputFileError
from GuidedSegLib.imageio import write_label_map
from GuidedSegLib.store import CaseStore

NAMES = {1: "liver", 2: "spleen", 3: "kidney_left"}
COLOURS = {1: (0.9, 0.5, 0.4), 2: (0.6, 0.4, 0.6), 3: (0.7, 0.4, 0.3)}
STORE_LABELS = {1: "liver", 2: "spleen", 3: "kidney_left", 4: "pancreas"}


@pytest.fixture(scope="module")
def case():
    return oblique_case(size=(48, 44, 14))


def volume_node(scene, image, name="ct"):
    return nodes.image_to_volume(image, scene, name)


def geometry(node):
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)]), node.GetImageData().GetDimensions()


def draft_segmentation(tmp_path, scene, logic, volume, label):
    """What Segment leaves: the draft file and a segmentation node made from it, tagged."""
    draft = write_label_map(label, tmp_path / "draft.nrrd")
    node = nodes.label_file_to_segmentation(draft, NAMES, COLOURS, volume, scene, logic)
    nodes.set_draft(node, sitk.GetArrayFromImage(label), volume, scene)
    draft.unlink()  # the draft lives in the scene, not in a (temporary) file
    node.SetAttribute(export.DRAFT_LABELS_ATTRIBUTE, json.dumps({str(v): n for v, n in NAMES.items()}))
    node.SetAttribute(nodes.MODEL_NAME_ATTRIBUTE, "tiny-bundle")
    return node


def edit(node, name, volume, logic, scene, change):
    """Change one segment's voxels as the Segment Editor would."""
    segment_id = node.GetSegmentation().GetSegmentIdBySegmentName(name)
    mask = nodes.segment_mask(node, segment_id, volume, logic, scene).astype(np.uint8)
    change(mask)
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    labelmap.CopyOrientation(volume)
    slicer.util.updateVolumeFromArray(labelmap, mask)
    image = slicer.vtkOrientedImageData()
    image.DeepCopy(labelmap.GetImageData())
    m = vtk.vtkMatrix4x4()
    labelmap.GetIJKToRASMatrix(m)
    image.SetImageToWorldMatrix(m)
    assert logic.SetBinaryLabelmapToSegment(image, node, segment_id, logic.MODE_REPLACE)
    scene.RemoveNode(labelmap)


def dataset(store_root: Path) -> str:
    return (store_root / "dataset.json").read_text()


def files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != ".guidedseg.lock"}


# ----------------------------------------------------------------------------------------------


def test_volume_goes_to_a_file_and_back_with_identical_geometry(tmp_path, mrml, case):
    scene, _ = mrml
    image, _ = case
    float_image = sitk.Cast(image, sitk.sitkFloat32) * 0.37  # odd values too, not just int16
    for source in (image, float_image):
        node = volume_node(scene, source)
        path = nodes.write_volume(node, tmp_path / f"vol-{source.GetPixelIDTypeAsString()}.nrrd")
        back = nodes.read_volume(path, scene)
        (m1, d1), (m2, d2) = geometry(node), geometry(back)
        assert d1 == d2 == tuple(source.GetSize())
        assert np.abs(m1 - m2).max() < 1e-12, "IJK-to-RAS changed on the way out and back"
        assert np.array_equal(slicer.util.arrayFromVolume(node), slicer.util.arrayFromVolume(back))
        # and the file holds the scan's own (LPS) geometry, as SimpleITK and the CLI read it
        written = sitk.ReadImage(str(path))
        assert np.allclose(written.GetOrigin(), source.GetOrigin(), atol=1e-9, rtol=0)
        assert np.allclose(written.GetSpacing(), source.GetSpacing(), atol=1e-12, rtol=0)
        assert np.allclose(written.GetDirection(), source.GetDirection(), atol=1e-12, rtol=0)
        assert written.GetPixelID() == source.GetPixelID()


def test_non_scalar_volume_is_refused_by_name(tmp_path, mrml):
    scene, _ = mrml
    node = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "rgb photo")
    data = vtk.vtkImageData()
    data.SetDimensions(4, 4, 4)
    data.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 3)
    node.SetAndObserveImageData(data)
    with pytest.raises(nodes.NodeError, match="rgb photo: .*scalar volume"):
        nodes.write_volume(node, tmp_path / "x.nrrd")
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(nodes.NodeError, match="empty: has no voxels"):
        nodes.write_volume(empty, tmp_path / "y.nrrd")
    assert not list(tmp_path.iterdir())


def test_label_map_becomes_segments_with_the_bundles_names_colours_and_codes(tmp_path, mrml, case):
    scene, logic = mrml
    image, label = case
    volume = volume_node(scene, image)
    names = {**NAMES, 4: "pancreas"}  # the model knows an organ it did not find here
    node = nodes.label_file_to_segmentation(write_label_map(label, tmp_path / "draft.nrrd"), names, COLOURS, volume,
                                            scene, logic, node_name="draft")
    segmentation = node.GetSegmentation()
    by_name = {segmentation.GetNthSegment(i).GetName(): segmentation.GetNthSegmentID(i)
               for i in range(segmentation.GetNumberOfSegments())}
    assert set(by_name) == {"liver", "spleen", "kidney_left", "pancreas"}
    for value, name in NAMES.items():
        segment = segmentation.GetSegment(by_name[name])
        assert tuple(round(c, 6) for c in segment.GetColor()) == COLOURS[value]
        mask = nodes.segment_mask(node, by_name[name], volume, logic, scene)
        assert np.array_equal(mask, sitk.GetArrayFromImage(label) == value), name
    nodes_before = scene.GetNumberOfNodes()
    assert not nodes.segment_mask(node, by_name["pancreas"], volume, logic, scene).any()
    # the export's temporary labelmap, its display node and its new colour table are all gone again
    assert scene.GetNumberOfNodes() == nodes_before
    liver = segmentation.GetSegment(by_name["liver"]).GetTerminology()
    assert "SCT^10200004^Liver" in liver and liver.count("~") == 6
    assert "SCT^64033007^Kidney~SCT^7771000^Left" in segmentation.GetSegment(by_name["kidney_left"]).GetTerminology()
    # on the volume's geometry: the segmentation's reference is the volume
    assert node.GetNodeReference(node.GetReferenceImageGeometryReferenceRole()).GetID() == volume.GetID()


def test_label_map_off_the_volume_grid_or_with_unnamed_values_is_refused(tmp_path, mrml, case):
    scene, logic = mrml
    image, label = case
    volume = volume_node(scene, image)
    shifted = sitk.Image(label)
    shifted.SetOrigin([o + 0.3 for o in label.GetOrigin()])
    with pytest.raises(InputFileError, match="does not lie on its image's grid"):
        nodes.label_file_to_segmentation(write_label_map(shifted, tmp_path / "off.nrrd"), NAMES, None, volume,
                                         scene, logic)
    with pytest.raises(nodes.NodeError, match=r"values \[3\] that the model does not name"):
        nodes.label_to_segmentation(label, {1: "liver", 2: "spleen"}, None, volume, scene, logic)


def test_export_after_editing_a_segment_writes_exactly_the_edited_labels(tmp_path, mrml, case):
    scene, logic = mrml
    image, label = case
    store = CaseStore.create(tmp_path / "store", STORE_LABELS)
    volume = volume_node(scene, image, "patient 7")
    seg = draft_segmentation(tmp_path, scene, logic, volume, label)
    truth = sitk.GetArrayFromImage(label)

    def erode_top(mask):
        mask[mask.shape[0] // 2:] = 0

    edit(seg, "spleen", volume, logic, scene, erode_top)
    plan = export.plan_export(seg, volume, store, logic, scene)
    assert plan.action == "add" and plan.case_id == "patient_7" and plan.edited == [2]
    assert "Counted as annotated: spleen (edited)" in plan.summary()
    case_entry = export.perform_export(plan, store)

    stored = sitk.GetArrayFromImage(sitk.ReadImage(str(case_entry.label)))
    expected = np.where(truth == 2, 2, 0)
    expected[expected.shape[0] // 2:] = 0
    assert np.array_equal(stored, expected), "the stored label must hold exactly the edited spleen"
    assert case_entry.annotated == (2,) and case_entry.absent == ()
    assert case_entry.history[-1]["model"] == "tiny-bundle"
    stored_image = sitk.ReadImage(str(case_entry.image))
    assert np.array_equal(sitk.GetArrayFromImage(stored_image), sitk.GetArrayFromImage(image))
    assert np.allclose(stored_image.GetDirection(), image.GetDirection(), atol=1e-6)
    # a second export of the same volume is a new label version of that case, not a new case
    edit(seg, "liver", volume, logic, scene, lambda m: m.__setitem__(slice(0, 2), 0))
    again = export.plan_export(seg, volume, store, logic, scene)
    assert (again.action, again.case_id, again.edited) == ("ingest", "patient_7", [1, 2])
    second = export.perform_export(again, store)
    assert second.label_version == 2 and second.annotated == (1, 2) and len(store.cases()) == 1


def test_two_edited_and_one_ticked_are_exactly_the_annotated_set(tmp_path, mrml, case):
    scene, logic = mrml
    image, label = case
    store = CaseStore.create(tmp_path / "store", STORE_LABELS)
    store.add_unlabeled(image, "case_a")
    volume = nodes.read_volume(store.case("case_a").image, scene, "case_a")  # as loading it in Slicer does
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(store.case("case_a").image))
    volume.SetAndObserveStorageNodeID(storage.GetID())
    seg = draft_segmentation(tmp_path, scene, logic, volume, label)
    edit(seg, "liver", volume, logic, scene, lambda m: m.__setitem__((slice(None), slice(0, 5)), 1))
    edit(seg, "spleen", volume, logic, scene, lambda m: m.fill(0))  # erased: checked and absent

    plan = export.plan_export(seg, volume, store, logic, scene)
    assert (plan.action, plan.case_id, plan.case_kind) == ("ingest", "case_a", "unlabeled")
    assert plan.edited == [1, 2]
    text = plan.summary(checked=[3])
    assert "Counted as annotated: liver (edited), kidney_left (checked)" in text
    assert "Checked and absent: spleen (edited)" in text
    assert "Not annotated (unknown to training, left out of the label): pancreas" in text
    case_entry = export.perform_export(plan, store, checked=[3])
    assert case_entry.kind == "labeled" and case_entry.annotated == (1, 3) and case_entry.absent == (2,)
    stored = sitk.GetArrayFromImage(sitk.ReadImage(str(case_entry.label)))
    assert set(np.unique(stored)) == {0, 1, 3}

    # ingesting a label with an organ outside the store's label set is still refused
    outside = sitk.Image(label)
    outside = sitk.Cast(outside, sitk.sitkUInt8)
    outside[0, 0, 0] = 9
    before = dataset(store.root)
    with pytest.raises(InputFileError, match=r"label values \[9\] are not in the store's label set"):
        store.ingest_label("case_a", outside, annotated=["liver"])
    assert dataset(store.root) == before


def test_export_refuses_mismatched_segment_names_and_touches_nothing(tmp_path, mrml, case):
    scene, logic = mrml
    image, label = case
    store = CaseStore.create(tmp_path / "store", {1: "liver", 2: "spleen"})
    volume = volume_node(scene, image)
    seg = draft_segmentation(tmp_path, scene, logic, volume, label)  # has kidney_left, unknown to the store
    before, before_files = dataset(store.root), files(store.root)
    with pytest.raises(export.ExportRefused, match=r"Segments 'kidney_left' are not in the store's label set "
                                                   r"\(liver, spleen\)"):
        export.plan_export(seg, volume, store, logic, scene)
    seg.GetSegmentation().GetSegment(seg.GetSegmentation().GetSegmentIdBySegmentName("kidney_left")).SetName("Liver")
    with pytest.raises(export.ExportRefused, match="are both the store's organ 'liver'"):
        export.plan_export(seg, volume, store, logic, scene)
    assert dataset(store.root) == before and files(store.root) == before_files
    assert volume.GetAttribute(nodes.CASE_ATTRIBUTE) is None


def test_export_with_nothing_edited_or_ticked_and_of_a_test_case_is_refused(tmp_path, mrml, case):
    scene, logic = mrml
    image, label = case
    store = CaseStore.create(tmp_path / "store", STORE_LABELS)
    volume = volume_node(scene, image, "untouched")
    seg = draft_segmentation(tmp_path, scene, logic, volume, label)
    plan = export.plan_export(seg, volume, store, logic, scene)
    assert plan.edited == [] and plan.draft_found
    before = dataset(store.root)
    with pytest.raises(export.ExportRefused, match="No segment was edited and none is ticked"):
        export.perform_export(plan, store)
    assert dataset(store.root) == before
    # ticking everything the model found: the draft counts as checked by the annotator
    case_entry = export.perform_export(plan, store, checked=[1, 2, 3])
    assert case_entry.annotated == (1, 2, 3)
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(case_entry.label))), sitk.GetArrayFromImage(label))

    store.add_test(image, label, "held_out")
    test_volume = volume_node(scene, image, "held_out")
    test_volume.SetAttribute(nodes.CASE_ATTRIBUTE, "held_out")
    test_volume.SetAttribute(nodes.STORE_ATTRIBUTE, str(store.root))
    (tmp_path / "second").mkdir()
    seg2 = draft_segmentation(tmp_path / "second", scene, logic, test_volume, label)
    with pytest.raises(export.ExportRefused, match="test case held_out"):
        export.plan_export(seg2, test_volume, store, logic, scene)


def replace_segment(scene, logic, node, volume, name, mask):
    """What painting in the Segment Editor leaves: segment ``name`` now holds exactly ``mask``."""
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    labelmap.CopyOrientation(volume)
    slicer.util.updateVolumeFromArray(labelmap, mask.astype(np.uint8))
    old = node.GetSegmentation().GetSegmentIdBySegmentName(name)
    assert logic.ImportLabelmapToSegmentationNode(labelmap, node, "edited")
    new = node.GetSegmentation().GetNthSegmentID(node.GetSegmentation().GetNumberOfSegments() - 1)
    node.GetSegmentation().RemoveSegment(old)
    node.GetSegmentation().GetSegment(new).SetName(name)
    scene.RemoveNode(labelmap)


def test_the_draft_is_a_hidden_node_beside_the_segmentation_and_tells_the_edits(tmp_path, mrml, case):
    scene, logic = mrml
    image, label = case
    volume = volume_node(scene, image, "with draft")
    seg = draft_segmentation(tmp_path, scene, logic, volume, label)
    draft = nodes.draft_node(seg)
    assert draft.GetHideFromEditors() and draft.IsA("vtkMRMLLabelMapVolumeNode")
    assert not list(tmp_path.glob("*.nrrd"))  # no file holds it
    assert np.array_equal(nodes.draft_array(seg, volume), sitk.GetArrayFromImage(label))
    assert export.edited_segments(seg, volume, logic, scene) == []
    spleen = sitk.GetArrayFromImage(label) == 2
    spleen[:, :5] = False
    replace_segment(scene, logic, seg, volume, "spleen", spleen)
    assert export.edited_segments(seg, volume, logic, scene) == ["spleen"]
    # a new draft for the same node replaces the old one (and removes it from the scene)
    nodes.set_draft(seg, sitk.GetArrayFromImage(label), volume, scene)
    assert draft.GetScene() is None and nodes.draft_node(seg) is not draft


def test_deleting_a_segmentation_lets_its_draft_go_and_keeps_the_others(tmp_path, mrml, case):
    scene, logic = mrml
    image, label = case
    volume = volume_node(scene, image, "two drafts")
    kept = draft_segmentation(tmp_path, scene, logic, volume, label)
    gone = draft_segmentation(tmp_path, scene, logic, volume, label)
    gone_draft = nodes.draft_node(gone)
    scene.RemoveNode(gone)
    assert nodes.remove_orphan_drafts(scene) == 1
    assert gone_draft.GetScene() is None and nodes.draft_node(kept).GetScene() is scene
    assert nodes.remove_orphan_drafts(scene) == 0


def test_without_its_draft_nothing_counts_as_edited_and_only_ticked_organs_are_recorded(tmp_path, mrml, case):
    scene, logic = mrml
    image, label = case
    store = CaseStore.create(tmp_path / "store", STORE_LABELS)
    volume = volume_node(scene, image, "draft gone")
    seg = draft_segmentation(tmp_path, scene, logic, volume, label)
    liver = sitk.GetArrayFromImage(label) == 1
    liver[:2] = False
    replace_segment(scene, logic, seg, volume, "liver", liver)
    scene.RemoveNode(nodes.draft_node(seg))  # the draft is gone

    assert export.edited_segments(seg, volume, logic, scene) is None
    plan = export.plan_export(seg, volume, store, logic, scene)
    assert plan.edited == [] and not plan.draft_found
    assert all(not o.edited for o in plan.organs) and {o.value for o in plan.organs if o.voxels} == {1, 2, 3}
    assert "No model draft found" in plan.summary() and "tick every organ you reviewed" in plan.summary()
    before = dataset(store.root)
    with pytest.raises(export.ExportRefused, match="none is ticked"):
        export.perform_export(plan, store)
    assert dataset(store.root) == before
    stored = export.perform_export(plan, store, checked=[1])  # the annotator reviewed the liver only
    assert stored.annotated == (1,) and stored.absent == ()
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(stored.label)))
    assert np.array_equal(written == 1, liver) and set(np.unique(written)) == {0, 1}


def test_settings_live_in_the_scenes_parameter_node(mrml, case):
    scene, _ = mrml
    params = PanelParameters(parameter_node(scene))
    volume = volume_node(scene, case[0], "for params")
    params.input_volume = volume
    params.model = "/models/a"
    params.device = "cuda:1"
    params.ensemble = True
    params.method = "cps"
    again = PanelParameters(parameter_node(scene))  # the same singleton node, found again
    assert again.node is params.node or again.node.GetID() == params.node.GetID()
    assert (again.input_volume.GetID(), again.model, again.device, again.ensemble, again.method) == \
        (volume.GetID(), "/models/a", "cuda:1", True, "cps")
    assert again.largest_component is False and again.segmentation is None
    with pytest.raises(ValueError, match="not one of"):
        again.method = "magic"
    assert again.replace_segmentation is False  # Segment makes a new segmentation unless asked
    assert params.node.GetAttribute("ModuleName") == "GuidedSeg"  # getAllParameterNodes() finds it
