"""Image I/O: geometry survives every format; Slicer segmentations map to named label maps;
bad files give one-line errors that name the file."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from GuidedSegLib.errors import InputFileError
from GuidedSegLib.geometry import Grid
from GuidedSegLib.imageio import (
    read_grid,
    read_image,
    read_label_map,
    write_image,
    write_label_map,
)

SLICERIO_DATA = Path(slicerio.__file__).parent / "data"


def assert_same_geometry(a: sitk.Image, b: sitk.Image, tolerance: float = 1e-6) -> None:
    assert a.GetSize() == b.GetSize()
    for name in ("GetSpacing", "GetOrigin"):
        x, y = np.asarray(getattr(a, name)()), np.asarray(getattr(b, name)())
        # relative to max(1, |value|): NIfTI stores geometry as float32, which is exact to ~1e-7 relative
        assert np.all(np.abs(x - y) <= tolerance * np.maximum(1, np.abs(x))), (name, x, y)
    assert np.allclose(a.GetDirection(), b.GetDirection(), atol=tolerance, rtol=0)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".nhdr"])
def test_every_format_keeps_geometry_and_values(tmp_path, oblique, suffix):
    image, _ = oblique
    path = write_image(image, tmp_path / f"case{suffix}")
    back = read_image(path)
    assert_same_geometry(image, back)
    assert np.array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(image))
    assert read_grid(path).mismatch(Grid.of(image), tolerance=1e-6) is None
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_double_precision_formats_keep_geometry_to_rounding(tmp_path, oblique, suffix):
    image, _ = oblique
    back = read_image(write_image(image, tmp_path / f"case{suffix}"))
    assert_same_geometry(image, back, tolerance=1e-12)


def write_dicom_series(image: sitk.Image, folder: Path) -> None:
    """Write ``image`` as a CT DICOM series, one file per slice, with full geometry tags."""
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    direction = image.GetDirection()
    series_uid = "1.2.826.0.1.3680043.2.1125.1.4242"
    for k in range(image.GetDepth()):
        slice_ = image[:, :, k]
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {
            "0008|0060": "CT", "0020|000e": series_uid, "0020|000d": series_uid + ".1",
            "0008|0018": f"{series_uid}.2.{k}", "0020|0013": str(k),
            "0020|0032": "\\".join(f"{v:.10f}" for v in position),
            "0020|0037": "\\".join(f"{v:.12f}" for v in (direction[0], direction[3], direction[6],
                                                          direction[1], direction[4], direction[7])),
            "0028|0030": f"{image.GetSpacing()[1]:.10f}\\{image.GetSpacing()[0]:.10f}",
            "0018|0050": f"{image.GetSpacing()[2]:.10f}",
        }
        for tag, value in tags.items():
            slice_.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(slice_)


def test_dicom_series_folder_reads_with_its_geometry(tmp_path, oblique):
    image, _ = oblique
    write_dicom_series(image, tmp_path / "series")
    back = read_image(tmp_path / "series")
    assert np.array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(image))
    assert_same_geometry(image, back, tolerance=1e-6)


def test_slicer_segmentation_files_load_as_named_label_maps():
    plain = read_label_map(SLICERIO_DATA / "Segmentation.seg.nrrd")
    assert plain.names == {1: "ribs", 2: "cervical vertebral column", 3: "thoracic vertebral column",
                           4: "lumbar vertebral column", 5: "right lung", 6: "left lung", 7: "tissue"}
    assert plain.values_present() == [1, 2, 3, 4, 5, 6, 7]
    ct = read_image(SLICERIO_DATA / "CTChest4.nrrd")
    assert Grid.of(ct).mismatch(Grid.of(plain.image)) is None


def test_overlapping_segments_in_layers_map_to_one_label_map_smaller_wins():
    raw = slicerio.read_segmentation(str(SLICERIO_DATA / "SegmentationOverlapping.seg.nrrd"))
    assert raw["voxels"].ndim == 4 and raw["voxels"].shape[0] == 2  # two layers: segments overlap
    masks = [raw["voxels"][s["layer"]] == s["labelValue"] for s in raw["segments"]]  # (I, J, K) each
    expected = np.zeros(masks[0].shape, np.uint8)
    for index in sorted(range(len(masks)), key=lambda i: -masks[i].sum()):
        expected[masks[index]] = index + 1
    label = read_label_map(SLICERIO_DATA / "SegmentationOverlapping.seg.nrrd")
    assert label.names[8] == "overlapping sphere" and len(label.names) == 8
    array = sitk.GetArrayFromImage(label.image).transpose(2, 1, 0)
    assert np.array_equal(array, expected)
    sphere, tissue = masks[7], masks[6]
    assert np.any(sphere & tissue) and np.all(array[sphere & tissue] != 7)  # tissue (larger) loses


def test_segments_map_to_a_label_set_by_name_ignoring_case_and_spaces():
    names = {0: "background", 3: "Right_Lung", 4: "LEFT-lung", 10: "ribs", 11: "tissue", 12: "cervical vertebral column",
             13: "thoracic vertebral column", 14: "lumbar vertebral column"}
    label = read_label_map(SLICERIO_DATA / "Segmentation.seg.nrrd", label_names=names)
    assert label.values_present() == [3, 4, 10, 11, 12, 13, 14]
    with pytest.raises(InputFileError, match=r"Segmentation.seg.nrrd: segments \['right lung', 'left lung'\] are not"):
        read_label_map(SLICERIO_DATA / "Segmentation.seg.nrrd", label_names={1: "ribs", 2: "tissue",
                                                                             5: "cervical vertebral column",
                                                                             6: "thoracic vertebral column",
                                                                             7: "lumbar vertebral column"})


def test_label_map_written_as_seg_nrrd_opens_with_same_names_values_and_geometry(tmp_path, oblique):
    _, label = oblique
    names = {1: "liver", 2: "spleen", 3: "kidney_left", 4: "pancreas"}  # 4 is empty: kept as a segment
    path = write_label_map(label, tmp_path / "out.seg.nrrd", names)
    back = read_label_map(path)
    assert back.names == names
    assert np.array_equal(sitk.GetArrayViewFromImage(back.image), sitk.GetArrayViewFromImage(label))
    assert_same_geometry(label, back.image, tolerance=1e-9)
    raw = slicerio.read_segmentation(str(path))
    assert [s["name"] for s in raw["segments"]] == ["liver", "spleen", "kidney_left", "pancreas"]


def test_cropped_segmentation_is_placed_on_the_image_grid_exactly(tmp_path, oblique):
    image, label = oblique
    names = {1: "liver", 2: "spleen", 3: "kidney_left"}
    cropped = label[5:50, 4:40, 2:20]  # what Slicer saves: the segments' extent only
    path = write_label_map(cropped, tmp_path / "cropped.seg.nrrd", names)
    placed = read_label_map(path, label_names=names, reference=Grid.of(image))
    assert Grid.of(placed.image) == Grid.of(image)
    expected = np.zeros_like(sitk.GetArrayViewFromImage(label))
    expected[2:20, 4:40, 5:50] = sitk.GetArrayViewFromImage(label)[2:20, 4:40, 5:50]
    assert np.array_equal(sitk.GetArrayViewFromImage(placed.image), expected)


def test_label_on_another_grid_is_refused_with_the_file_name(tmp_path, oblique):
    image, label = oblique
    shifted = sitk.Image(label)
    shifted.SetOrigin(tuple(o + 0.4 for o in label.GetOrigin()))
    path = write_label_map(shifted, tmp_path / "shifted.nii.gz")
    with pytest.raises(InputFileError, match="shifted.nii.gz: does not lie on its image's grid"):
        read_label_map(path, reference=Grid.of(image))


def _one_line_error(call) -> str:
    with pytest.raises(InputFileError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_bad_files_get_one_line_errors_naming_the_file(tmp_path, oblique):
    image, _ = oblique
    flat = sitk.Image([20, 20], sitk.sitkInt16)
    sitk.WriteImage(flat, str(tmp_path / "flat.nii.gz"))
    assert "flat.nii.gz: is 2D" in _one_line_error(lambda: read_image(tmp_path / "flat.nii.gz"))

    series = sitk.JoinSeries([image, image])  # 4D, two frames
    sitk.WriteImage(series, str(tmp_path / "frames.nii.gz"))
    assert "frames.nii.gz: is 4D" in _one_line_error(lambda: read_image(tmp_path / "frames.nii.gz"))

    nan = sitk.Cast(image, sitk.sitkFloat32)
    nan[3, 4, 5] = float("nan")
    sitk.WriteImage(nan, str(tmp_path / "nan.nrrd"))
    assert "nan.nrrd: contains 1 NaN" in _one_line_error(lambda: read_image(tmp_path / "nan.nrrd"))
    nan[6, 2, 1] = float("inf")
    for name in ("nan.nii.gz", "nan.nii"):  # ITK itself reads NaN in NIfTI as 0
        sitk.WriteImage(nan, str(tmp_path / name))
        assert f"{name}: contains 2 NaN or infinite" in _one_line_error(lambda: read_image(tmp_path / name))
    finite = read_image(tmp_path / "nan.nii.gz", allow_non_finite=True)
    assert finite.GetSize() == image.GetSize()
    sitk.WriteImage(sitk.Cast(image, sitk.sitkFloat64), str(tmp_path / "double.nii.gz"))
    assert read_image(tmp_path / "double.nii.gz").GetPixelID() == sitk.sitkFloat64

    write_image(image, tmp_path / "whole.nii.gz")
    data = (tmp_path / "whole.nii.gz").read_bytes()
    (tmp_path / "truncated.nii.gz").write_bytes(data[: len(data) // 2])
    assert "truncated.nii.gz: is truncated" in _one_line_error(lambda: read_image(tmp_path / "truncated.nii.gz"))
    write_image(image, tmp_path / "whole.nii")
    data = (tmp_path / "whole.nii").read_bytes()
    (tmp_path / "truncated.nii").write_bytes(data[: len(data) - 100])
    assert "truncated.nii: is truncated" in _one_line_error(lambda: read_image(tmp_path / "truncated.nii"))

    (tmp_path / "notes.txt").write_text("hello")
    assert "notes.txt: unsupported file type" in _one_line_error(lambda: read_image(tmp_path / "notes.txt"))
    assert "missing.nii.gz: no such file" in _one_line_error(lambda: read_image(tmp_path / "missing.nii.gz"))

    (tmp_path / "empty").mkdir()
    assert "empty: holds no DICOM series" in _one_line_error(lambda: read_image(tmp_path / "empty"))

    fractional = sitk.Cast(image, sitk.sitkFloat32) * 0.5
    sitk.WriteImage(fractional, str(tmp_path / "fractional.nii.gz"))
    assert "fractional.nii.gz: holds non-integer values" in _one_line_error(
        lambda: read_label_map(tmp_path / "fractional.nii.gz"))


def test_a_failed_write_leaves_the_previous_file_intact(tmp_path, oblique, monkeypatch):
    image, _ = oblique
    target = write_image(image, tmp_path / "keep.nii.gz")
    before = target.read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(OSError):
        write_image(sitk.Cast(image, sitk.sitkFloat32), target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.nii.gz"]
