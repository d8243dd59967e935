"""MRML nodes <-> files, written against Slicer's MRML API only (no Qt, no application).

- a scalar volume node goes out to a file (NRRD keeps its geometry to the last bit) for the
  child process;
- a label map file comes back as a segmentation node on the volume's geometry, one segment per
  organ with the bundle's name, colour and standard terminology code;
- a segmentation node plus its reference volume goes out as one binary mask per segment, on the
  volume's full grid, from which the export builds the label map for the case store.

Slicer's IJK-to-RAS geometry is turned into SimpleITK's LPS geometry by flipping the first two
axes; ``slicer.util.arrayFromVolume`` and SimpleITK arrays share the (K, J, I) order. A volume
under a parent transform is written in its own (local) coordinates, and the segmentation is put
under the same transform, so the two always overlay.

The segmentations module logic is passed in (``slicer.modules.segmentations.logic()`` in Slicer,
a ``vtkSlicerSegmentationsModuleLogic`` with a scene in tests).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import slicer
import vtk
from slicer.util import arrayFromVolume, updateVolumeFromArray

from GuidedSegLib.errors import GuidedSegError
from GuidedSegLib.geometry import Grid
from GuidedSegLib.imageio import read_image, read_label_map, write_image
from GuidedSegLib.labels import label_colour

from .terminology import terminology_entry

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])

#: node attributes the panel sets on a segmentation it made, saved with the scene
DRAFT_ATTRIBUTE = "GuidedSeg.DraftFile"  # older panels: a draft file path (read when no draft node exists)
#: node reference from a segmentation to the hidden label map volume holding the model's draft
DRAFT_ROLE = "GuidedSeg.Draft"
ROLE_ATTRIBUTE = "GuidedSeg.Role"  # "draft" on the hidden draft node
MODEL_ATTRIBUTE = "GuidedSeg.Model"  # the bundle folder that made the draft (provenance)
MODEL_NAME_ATTRIBUTE = "GuidedSeg.ModelName"
#: node attributes set on a volume once it is a case of a store (so a second export adds a version)
CASE_ATTRIBUTE = "GuidedSeg.CaseId"
STORE_ATTRIBUTE = "GuidedSeg.Store"


class NodeError(ValueError):
    """A node that cannot be used; the message names the node and the problem."""

    def __init__(self, node, problem: str):
        name = node.GetName() if node is not None else "(no node)"
        super().__init__(f"{name}: {problem}")


# ----------------------------------------------------------------------------------------------
# volumes


def _matrix(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASDirectionMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(3)] for r in range(3)])


def volume_grid(node) -> Grid:
    """The volume's grid in SimpleITK terms (LPS origin and direction, (x, y, z) size)."""
    image = node.GetImageData() if node is not None else None
    if image is None:
        raise NodeError(node, "has no voxels")
    dims = image.GetDimensions()
    direction = _RAS_TO_LPS @ _matrix(node)
    origin = _RAS_TO_LPS @ np.asarray(node.GetOrigin(), dtype=float)
    return Grid(tuple(int(d) for d in dims), tuple(float(s) for s in node.GetSpacing()),
                tuple(float(o) for o in origin), tuple(float(d) for d in direction.flatten()))


def volume_to_image(node) -> sitk.Image:
    """A SimpleITK image with the volume's voxels and geometry (in LPS)."""
    if node is None or not node.IsA("vtkMRMLScalarVolumeNode"):
        raise NodeError(node, "is not a scalar volume; choose a CT or MR volume")
    image_data = node.GetImageData()
    if image_data is None or min(image_data.GetDimensions()) < 1:
        raise NodeError(node, "has no voxels")
    if image_data.GetNumberOfScalarComponents() != 1:
        raise NodeError(node, f"has {image_data.GetNumberOfScalarComponents()} components per voxel; "
                              "a scalar volume is needed")
    image = sitk.GetImageFromArray(np.ascontiguousarray(arrayFromVolume(node)))
    volume_grid(node).apply(image)
    return image


def write_volume(node, path: str | os.PathLike) -> Path:
    """Write a scalar volume node to ``path`` (atomically; use .nrrd to keep the geometry exactly)."""
    return write_image(volume_to_image(node), path, compress=False)


def image_to_volume(image: sitk.Image, scene, name: str, class_name: str = "vtkMRMLScalarVolumeNode",
                    node=None):
    """A volume node (new, or ``node`` updated) holding ``image`` with its geometry."""
    if node is None:
        node = scene.AddNewNodeByClass(class_name, name)
    grid = Grid.of(image)
    direction = _RAS_TO_LPS @ np.reshape(grid.direction, (3, 3))
    matrix = vtk.vtkMatrix4x4()
    for r in range(3):
        for c in range(3):
            matrix.SetElement(r, c, direction[r, c])
    node.SetIJKToRASDirectionMatrix(matrix)
    node.SetSpacing(*grid.spacing)
    node.SetOrigin(*(_RAS_TO_LPS @ np.asarray(grid.origin)))
    updateVolumeFromArray(node, sitk.GetArrayFromImage(image))
    return node


def read_volume(path: str | os.PathLike, scene, name: str | None = None):
    """Read a volume file (any format GuidedSegLib reads) into a new scalar volume node."""
    return image_to_volume(read_image(path), scene, name or Path(path).name.split(".")[0])


# ----------------------------------------------------------------------------------------------
# label maps -> segmentation


def label_to_segmentation(
    label: sitk.Image,
    names: Mapping[int, str],
    colours: Mapping[int, tuple[float, float, float]] | None,
    reference_volume,
    scene,
    segmentations_logic,
    node_name: str = "Segmentation",
    segmentation_node=None,
    add_missing: bool = True,
):
    """A segmentation node with one segment per organ of ``names`` (value -> name).

    ``label`` must lie on the reference volume's grid. Each segment gets its organ's name, colour
    (``colours``, 0..1; a stable default otherwise) and terminology code. Organs absent from the
    label get an empty segment when ``add_missing``, so the annotator can paint what the model
    missed. Label values without a name are refused.
    """
    grid = volume_grid(reference_volume)
    mismatch = grid.mismatch(Grid.of(label), tolerance=1e-6)
    if mismatch:
        raise NodeError(reference_volume, f"the label map does not lie on this volume's grid ({mismatch})")
    array = sitk.GetArrayFromImage(label)
    present = [int(v) for v in np.unique(array) if v != 0]
    unnamed = [v for v in present if v not in names]
    if unnamed:
        raise NodeError(reference_volume, f"the label map holds values {unnamed} that the model does not name "
                                          f"(it names {sorted(names)})")
    colours = dict(colours or {})

    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "GuidedSeg import")
    try:
        labelmap.CopyOrientation(reference_volume)
        updateVolumeFromArray(labelmap, array.astype(np.uint8 if array.max(initial=0) <= 255 else np.uint16))
        if segmentation_node is None:
            segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", node_name)
            segmentation_node.CreateDefaultDisplayNodes()
        else:
            segmentation_node.GetSegmentation().RemoveAllSegments()
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume)
        transform = reference_volume.GetParentTransformNode()
        segmentation_node.SetAndObserveTransformNodeID(transform.GetID() if transform else None)
        if present and not segmentations_logic.ImportLabelmapToSegmentationNode(labelmap, segmentation_node):
            raise NodeError(reference_volume, "Slicer could not import the label map into a segmentation")
    finally:
        scene.RemoveNode(labelmap)

    segmentation = segmentation_node.GetSegmentation()
    by_value = {}
    for index in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(index)
        by_value[int(segment.GetLabelValue())] = segmentation.GetNthSegmentID(index)
    for value, name in sorted((int(v), str(n)) for v, n in names.items() if int(v) != 0):
        colour = tuple(colours.get(value) or label_colour(name))
        segment_id = by_value.get(value)
        if segment_id is None:
            if not add_missing:
                continue
            segment_id = segmentation.AddEmptySegment(f"organ_{value}", name, list(colour))
        segment = segmentation.GetSegment(segment_id)
        segment.SetName(name)
        segment.SetColor(*colour)
        segment.SetNameAutoGenerated(False)
        segment.SetColorAutoGenerated(False)
        entry = terminology_entry(name)
        if entry:
            segment.SetTerminology(entry)
    return segmentation_node


def label_file_to_segmentation(path: str | os.PathLike, names, colours, reference_volume, scene, segmentations_logic,
                               **kwargs):
    """Read a label map file (on, or whole voxels inside, the volume's grid) into a segmentation node."""
    label = read_label_map(path, label_names={int(v): n for v, n in names.items()},
                           reference=volume_grid(reference_volume))
    return label_to_segmentation(label.image, names, colours, reference_volume, scene, segmentations_logic, **kwargs)


# ----------------------------------------------------------------------------------------------
# segmentation -> masks


# ----------------------------------------------------------------------------------------------
# the model's draft, kept beside the segmentation node


def set_draft(segmentation_node, label: np.ndarray, reference_volume, scene):
    """Keep ``label`` (K, J, I, on the reference volume's grid) as the segmentation's draft: a hidden
    label map volume node in the scene that the segmentation references (role :data:`DRAFT_ROLE`).

    The draft lives as long as the segmentation node does, wherever Slicer's temporary folder goes;
    a draft made earlier for this node is replaced (and removed from the scene).
    """
    grid = volume_grid(reference_volume)
    if tuple(reversed(label.shape)) != grid.size:
        raise NodeError(reference_volume, f"the draft's shape {label.shape} is not the volume's {grid.size[::-1]}")
    old = draft_node(segmentation_node)
    draft = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode",
                                    scene.GenerateUniqueName(f"{segmentation_node.GetName()} GuidedSeg draft"))
    draft.SetHideFromEditors(True)
    draft.SetAttribute(ROLE_ATTRIBUTE, "draft")
    draft.CopyOrientation(reference_volume)
    updateVolumeFromArray(draft, label.astype(np.uint8 if label.max(initial=0) <= 255 else np.uint16))
    transform = reference_volume.GetParentTransformNode()
    draft.SetAndObserveTransformNodeID(transform.GetID() if transform else None)
    segmentation_node.SetNodeReferenceID(DRAFT_ROLE, draft.GetID())
    segmentation_node.RemoveAttribute(DRAFT_ATTRIBUTE)
    if old is not None and old.GetScene() is not None:
        scene.RemoveNode(old)
    return draft


def draft_node(segmentation_node):
    """The hidden draft node of a segmentation, or None."""
    return segmentation_node.GetNodeReference(DRAFT_ROLE) if segmentation_node is not None else None


def remove_orphan_drafts(scene) -> int:
    """Remove the hidden draft nodes whose segmentation node is gone; returns how many."""
    referenced = set()
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")):
        draft = draft_node(scene.GetNthNodeByClass(i, "vtkMRMLSegmentationNode"))
        if draft is not None:
            referenced.add(draft.GetID())
    orphans = []
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLLabelMapVolumeNode")):
        node = scene.GetNthNodeByClass(i, "vtkMRMLLabelMapVolumeNode")
        if node.GetAttribute(ROLE_ATTRIBUTE) == "draft" and node.GetID() not in referenced:
            orphans.append(node)
    for node in orphans:
        scene.RemoveNode(node)
    return len(orphans)


def draft_array(segmentation_node, reference_volume) -> np.ndarray | None:
    """The model's draft as a (K, J, I) array on the reference volume's grid, or None when there is
    none (not made by Segment, the draft node was deleted, or it does not lie on this volume's grid)."""
    draft = draft_node(segmentation_node)
    if draft is None:
        path = segmentation_node.GetAttribute(DRAFT_ATTRIBUTE)  # made by an older panel
        if not path or not Path(path).is_file():
            return None
        grid = volume_grid(reference_volume)
        try:
            image = read_label_map(path, reference=grid).image
        except (OSError, ValueError, GuidedSegError):
            return None
        return sitk.GetArrayFromImage(image)
    if draft.GetImageData() is None:
        return None
    if volume_grid(draft).mismatch(volume_grid(reference_volume), tolerance=1e-6):
        return None
    return arrayFromVolume(draft).copy()


def segments(segmentation_node) -> list[tuple[str, str]]:
    """(segment id, name) of every segment, in the node's order."""
    segmentation = segmentation_node.GetSegmentation()
    return [(segmentation.GetNthSegmentID(i), segmentation.GetNthSegment(i).GetName())
            for i in range(segmentation.GetNumberOfSegments())]


def segment_mask(segmentation_node, segment_id: str, reference_volume, segmentations_logic, scene) -> np.ndarray:
    """One segment as a boolean (K, J, I) array on the reference volume's full grid."""
    tables = _colour_table_ids(scene)
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "GuidedSeg export")
    try:
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segment_id)
        if not segmentations_logic.ExportSegmentsToLabelmapNode(segmentation_node, ids, labelmap, reference_volume,
                                                                slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY):
            raise NodeError(segmentation_node, f"segment {segment_id!r} could not be exported")
        image = labelmap.GetImageData()
        expected = reference_volume.GetImageData().GetDimensions()
        if image is None or tuple(image.GetDimensions()) != tuple(expected):
            raise NodeError(segmentation_node, f"segment {segment_id!r} did not export onto the volume's grid")
        return arrayFromVolume(labelmap) != 0
    finally:
        # The export gives the labelmap a display node and a new "<segmentation>_ColorTable" node.
        # Slicer removes the display node with the labelmap, but not the table: remove both here.
        display = labelmap.GetDisplayNode()
        colour = display.GetColorNode() if display is not None else None
        scene.RemoveNode(labelmap)
        for node in (display, colour if colour is not None and colour.GetID() not in tables else None):
            if node is not None and node.GetScene() is not None:
                scene.RemoveNode(node)


def _colour_table_ids(scene) -> set[str]:
    return {scene.GetNthNodeByClass(i, "vtkMRMLColorTableNode").GetID()
            for i in range(scene.GetNumberOfNodesByClass("vtkMRMLColorTableNode"))}
