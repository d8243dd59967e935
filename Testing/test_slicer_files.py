"""Files GuidedSegLib writes open in 3D Slicer: read back with Slicer's own MRML storage node
(slicer-core), segment names, colours and voxels intact; and Slicer-written files read here."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import oblique_case

from GuidedSegLib.geometry import Grid
from GuidedSegLib.imageio import read_label_map, write_label_map

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")


@pytest.fixture(scope="module")
def scene(mrml):
    return mrml


def read_with_mrml(scene, path):
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    node.SetAndObserveStorageNodeID(storage.GetID())
    assert storage.ReadData(node) == 1
    return node


def test_slicer_opens_our_seg_nrrd_with_names_colours_and_voxels(tmp_path, scene):
    scene, logic = scene
    image, label = oblique_case(size=(40, 36, 12))
    names = {1: "liver", 2: "spleen", 3: "kidney_left"}
    colours = {1: (0.9, 0.5, 0.4), 2: (0.6, 0.4, 0.6), 3: (0.7, 0.4, 0.3)}
    path = write_label_map(label, tmp_path / "ours.seg.nrrd", names, colours)

    node = read_with_mrml(scene, path)
    segmentation = node.GetSegmentation()
    segments = [segmentation.GetNthSegment(i) for i in range(segmentation.GetNumberOfSegments())]
    assert [s.GetName() for s in segments] == ["liver", "spleen", "kidney_left"]
    assert [tuple(round(c, 3) for c in s.GetColor()) for s in segments] == list(colours.values())

    # Export through Slicer onto a labelmap node with the reference geometry: same voxels.
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    volume.SetSpacing(image.GetSpacing())
    ras_origin = np.array(image.GetOrigin()) * [-1, -1, 1]
    volume.SetOrigin(*ras_origin)
    direction = np.reshape(image.GetDirection(), (3, 3)) * np.array([-1, -1, 1])[:, None]
    matrix = vtk.vtkMatrix4x4()
    for r in range(3):
        for c in range(3):
            matrix.SetElement(r, c, direction[r, c])
    volume.SetIJKToRASDirectionMatrix(matrix)
    blank = vtk.vtkImageData()
    blank.SetDimensions(*image.GetSize())
    blank.AllocateScalars(vtk.VTK_SHORT, 1)
    volume.SetAndObserveImageData(blank)
    exported = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    ids = vtk.vtkStringArray()
    for i in range(segmentation.GetNumberOfSegments()):
        ids.InsertNextValue(segmentation.GetNthSegmentID(i))
    assert logic.ExportSegmentsToLabelmapNode(node, ids, exported, volume,
                                              slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
    from vtk.util.numpy_support import vtk_to_numpy

    voxels = vtk_to_numpy(exported.GetImageData().GetPointData().GetScalars()).reshape(image.GetSize()[::-1])
    assert np.array_equal(voxels, sitk.GetArrayViewFromImage(label))


def test_we_read_what_slicer_writes(tmp_path, scene):
    scene, _ = scene
    _, label = oblique_case(size=(40, 36, 12))
    ours = write_label_map(label, tmp_path / "ours.seg.nrrd", {1: "liver", 2: "spleen", 3: "kidney_left"})
    node = read_with_mrml(scene, ours)
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(tmp_path / "slicer.seg.nrrd"))
    assert storage.WriteData(node) == 1  # Slicer's writer: crops to the segments' extent
    back = read_label_map(tmp_path / "slicer.seg.nrrd", label_names={0: "background", 1: "liver", 2: "spleen",
                                                                       3: "kidney_left"},
                          reference=Grid.of(label))
    assert np.array_equal(sitk.GetArrayViewFromImage(back.image), sitk.GetArrayViewFromImage(label))
