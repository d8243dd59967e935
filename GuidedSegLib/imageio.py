"""Reading and writing volumes and label maps: NIfTI, NRRD, MHA/MHD, DICOM series, Slicer ``.seg.nrrd``.

Every reader returns SimpleITK images with the file's geometry untouched and refuses, with an
:class:`~GuidedSegLib.errors.InputFileError` naming the file, anything that is not a readable 3D
scalar volume. Every writer writes to a temporary file beside the target and renames it, so a
crash never leaves a half-written file under the real name.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import secrets
import shutil
import struct
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputFileError
from .geometry import Grid, embed_in_grid
from .labels import label_colour, normalise_name

SEGMENTATION_SUFFIX = ".seg.nrrd"
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")

PathLike = "str | os.PathLike[str]"


def file_suffix(path: PathLike) -> str:
    """The format-defining suffix of ``path`` ('.seg.nrrd', '.nii.gz', ...), or 'dicom' for a folder."""
    p = Path(path)
    if p.is_dir():
        return "dicom"
    name = p.name.lower()
    for suffix in (SEGMENTATION_SUFFIX, *IMAGE_SUFFIXES):
        if name.endswith(suffix):
            return suffix
    raise InputFileError(path, "unsupported file type; use .nii, .nii.gz, .nrrd, .seg.nrrd, .mha, .mhd "
                               "or a folder holding one DICOM series")


def case_id_from_path(path: PathLike) -> str:
    """The file name without its image suffix: '/a/liver_7.nii.gz' -> 'liver_7'."""
    p = Path(path)
    suffix = file_suffix(p)
    return p.name if suffix == "dicom" else p.name[: -len(suffix)]


# ----------------------------------------------------------------------------------------------
# Volumes


def read_image(path: PathLike, *, allow_non_finite: bool = False) -> sitk.Image:
    """Read a 3D scalar volume from a file or a DICOM series folder.

    Refuses (InputFileError naming the file): missing or unreadable files, 2D images, 4D images
    with more than one frame, vector images, volumes with a single slice, and NaN or infinite
    voxels (unless ``allow_non_finite``).
    """
    p = Path(path)
    if not p.exists():
        raise InputFileError(path, "no such file or folder")
    suffix = file_suffix(p)
    if suffix == SEGMENTATION_SUFFIX:
        return read_label_map(p).image
    if suffix == "dicom":
        image = _read_dicom_series(p)
    else:
        if suffix in (".nii", ".nii.gz"):
            _check_nifti(p, allow_non_finite)
        try:
            image = sitk.ReadImage(str(p))
        except RuntimeError as error:
            raise InputFileError(path, f"cannot be read as an image ({_first_line(error)})") from None
    return check_volume(image, path, allow_non_finite=allow_non_finite)


def read_grid(path: PathLike) -> Grid:
    """The grid of an image file from its header alone (cheap: voxels are not read)."""
    p = Path(path)
    if not p.exists():
        raise InputFileError(path, "no such file or folder")
    if file_suffix(p) == "dicom":
        return Grid.of(read_image(p))
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise InputFileError(path, f"cannot be read as an image ({_first_line(error)})") from None
    if reader.GetDimension() != 3:
        raise InputFileError(path, f"is {reader.GetDimension()}D; a 3D volume is needed")
    direction = reader.GetDirection()
    return Grid(tuple(reader.GetSize()), tuple(reader.GetSpacing()), tuple(reader.GetOrigin()), tuple(direction))


@dataclass(frozen=True)
class _NiftiLayout:
    """Where a NIfTI file's voxels are and what they are, from its header."""

    offset: int  # bytes before the first voxel
    voxels: int
    bitpix: int
    dtype: str | None  # numpy dtype of a floating-point voxel type, else None

    @property
    def file_size(self) -> int:
        return self.offset + self.voxels * self.bitpix // 8


_NIFTI_FLOAT_TYPES = {16: "f4", 64: "f8"}  # NIfTI datatype codes of float32 and float64


def _nifti_layout(header: bytes) -> _NiftiLayout | None:
    """The voxel layout of a NIfTI-1/2 header; None if it is not one we know."""
    for endian in "<>":
        if len(header) >= 348 and struct.unpack(endian + "i", header[:4])[0] == 348:
            dims = struct.unpack(endian + "8h", header[40:56])
            datatype, bitpix = struct.unpack(endian + "2h", header[70:74])
            offset = int(struct.unpack(endian + "f", header[108:112])[0])
            break
        if len(header) >= 540 and struct.unpack(endian + "i", header[:4])[0] == 540:
            datatype, bitpix = struct.unpack(endian + "2h", header[12:16])
            dims = struct.unpack(endian + "8q", header[16:80])
            offset = struct.unpack(endian + "q", header[168:176])[0]
            break
    else:
        return None
    rank = dims[0]
    if not 1 <= rank <= 7 or bitpix <= 0:
        return None
    voxels = int(np.prod([max(1, d) for d in dims[1 : rank + 1]], dtype=np.int64))
    dtype = _NIFTI_FLOAT_TYPES.get(datatype)
    return _NiftiLayout(offset, voxels, bitpix, endian + dtype if dtype else None)


def _check_nifti(path: Path, allow_non_finite: bool) -> None:
    """Refuse what ITK would read silently wrong: a truncated NIfTI file (missing voxels become
    0) and, unless ``allow_non_finite``, NaN voxels in a float NIfTI file (ITK reads them as 0)."""
    compressed = path.name.lower().endswith(".gz")
    try:
        with (gzip.open if compressed else open)(path, "rb") as handle:
            header = handle.read(540)
    except (OSError, EOFError) as error:
        raise InputFileError(path, f"cannot be read as an image ({error})") from None
    layout = _nifti_layout(header)
    if layout is None:
        return  # not a NIfTI header we know; let ITK judge it
    check_finite = layout.dtype is not None and not allow_non_finite
    if not compressed:
        size = path.stat().st_size
    else:
        with open(path, "rb") as handle:  # gzip's last 4 bytes: uncompressed size mod 2**32
            handle.seek(-4, os.SEEK_END)
            trailer = struct.unpack("<I", handle.read(4))[0]
        size = layout.file_size if trailer == layout.file_size % 2**32 else None  # None: read to know
    if size is not None and size < layout.file_size:
        raise InputFileError(path, f"is truncated: {size} bytes where the header needs {layout.file_size}")
    if size is not None and not check_finite:
        return
    present, bad = _stream_voxels(path, compressed, layout, check_finite)  # one pass for both checks
    if layout.offset + present < layout.file_size:
        raise InputFileError(path, f"is truncated: {layout.offset + present} bytes where the header needs "
                                   f"{layout.file_size}")
    if bad:
        raise InputFileError(path, _non_finite_message(bad))


def _stream_voxels(path: Path, compressed: bool, layout: _NiftiLayout, check_finite: bool) -> tuple[int, int]:
    """(voxel bytes present, non-finite voxels counted if ``check_finite``), in bounded memory."""
    need = layout.file_size - layout.offset
    dtype = np.dtype(layout.dtype) if check_finite else None
    present = bad = 0
    try:
        with (gzip.open if compressed else open)(path, "rb") as handle:
            handle.seek(layout.offset)
            while present < need and (block := handle.read(min(1 << 24, need - present))):
                present += len(block)
                if dtype is not None:
                    values = np.frombuffer(block, dtype=dtype, count=len(block) // dtype.itemsize)
                    bad += int(values.size - np.count_nonzero(np.isfinite(values)))
    except (OSError, EOFError, zlib.error):
        raise InputFileError(path, "is truncated or damaged (its compressed data ends early)") from None
    return present, bad


def _non_finite_message(count: int) -> str:
    return f"contains {count} NaN or infinite voxels"


def _read_dicom_series(folder: Path) -> sitk.Image:
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise InputFileError(folder, "holds no DICOM series")
    if len(series) > 1:
        raise InputFileError(folder, f"holds {len(series)} DICOM series ({', '.join(series)}); "
                                     "put the one to use in a folder of its own")
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0])
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        return reader.Execute()
    except RuntimeError as error:
        raise InputFileError(folder, f"DICOM series cannot be read ({_first_line(error)})") from None


def check_volume(image: sitk.Image, where: PathLike, *, allow_non_finite: bool = False) -> sitk.Image:
    """The image as a 3D scalar volume, or InputFileError naming ``where``: vector images, 2D,
    4D with more than one frame, a single slice, and NaN/infinite voxels are refused."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputFileError(where, f"has {image.GetNumberOfComponentsPerPixel()} components per voxel; "
                                    "a scalar volume is needed")
    dimension = image.GetDimension()
    if dimension == 4 and image.GetSize()[3] == 1:
        image = sitk.Extract(image, list(image.GetSize()[:3]) + [0], [0, 0, 0, 0])
        dimension = 3
    if dimension != 3:
        raise InputFileError(where, f"is {dimension}D with size {list(image.GetSize())}; a 3D volume is needed")
    if min(image.GetSize()) < 2:
        raise InputFileError(where, f"has size {list(image.GetSize())}: a single slice is not a 3D volume")
    if not allow_non_finite and image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
        bad = int(np.count_nonzero(~np.isfinite(sitk.GetArrayViewFromImage(image))))
        if bad:
            raise InputFileError(where, _non_finite_message(bad))
    return image


def write_image(image: sitk.Image, path: PathLike, *, compress: bool = True) -> Path:
    """Write a volume atomically; the format follows the suffix. Returns the path written."""
    p = Path(path)
    suffix = file_suffix(p)
    if suffix in ("dicom", SEGMENTATION_SUFFIX):
        raise InputFileError(path, "write volumes as .nii.gz, .nii, .nrrd or .mha")
    if suffix in (".nhdr", ".mhd"):
        _write_detached(image, p, compress)
        return p
    with atomic_path(p) as tmp:
        sitk.WriteImage(image, str(tmp), compress)
    return p


def _write_detached(image: sitk.Image, path: Path, compress: bool) -> None:
    """Header + data file pair: written under their final names in a temporary folder beside
    ``path``, then moved, data first, so the header never names a missing or partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = path.parent / f".tmp-{secrets.token_hex(4)}"
    folder.mkdir()
    try:
        sitk.WriteImage(image, str(folder / path.name), compress)
        written = sorted(folder.iterdir(), key=lambda f: f.name == path.name)  # header last
        for file in written:
            os.replace(file, path.parent / file.name)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix); on success rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{secrets.token_hex(4)}-{path.name}")
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    # ITK puts the useful sentence last ("...: Could not create IO object for reading file").
    return lines[-1] if lines else error.__class__.__name__


# ----------------------------------------------------------------------------------------------
# Label maps


@dataclass
class LabelMap:
    """A label map with the names (and display colours) of its values. Background 0 has no name."""

    image: sitk.Image
    names: dict[int, str]
    colours: dict[int, tuple[float, float, float]] = field(default_factory=dict)

    def values_present(self) -> list[int]:
        values = np.unique(sitk.GetArrayViewFromImage(self.image))
        return [int(v) for v in values if v != 0]


def read_label_map(
    path: PathLike,
    *,
    label_names: Mapping[int, str] | None = None,
    reference: Grid | None = None,
) -> LabelMap:
    """Read a label map from a label volume file or a Slicer ``.seg.nrrd``.

    ``label_names`` (value -> name) is the label set the caller works in: segments of a
    ``.seg.nrrd`` are mapped to these values through their names (case, spaces and dashes are
    ignored), and a segment whose name is not in the set is refused. Where segments overlap
    (several layers), the smaller segment wins. Without ``label_names`` a ``.seg.nrrd`` keeps its
    own label values (numbered in segment order when layers overlap).

    ``reference`` is the grid of the image the labels belong to: a label map on the same grid
    takes it exactly; a ``.seg.nrrd`` saved on a whole-voxel sub-block or super-block of it
    (Slicer crops them to their content) is placed onto it without interpolation; anything
    else is refused, a plain label file of another size too.
    """
    p = Path(path)
    if not p.exists():
        raise InputFileError(path, "no such file")
    if file_suffix(p) != SEGMENTATION_SUFFIX:
        image = read_image(p)
        mismatch = reference.mismatch(Grid.of(image)) if reference is not None else None
        if mismatch is not None:  # only Slicer's .seg.nrrd is saved on a part of the image's grid
            raise InputFileError(p, f"does not lie on its image's grid ({mismatch}); a label file must have the "
                                    "image's size, spacing, origin and direction (only a Slicer .seg.nrrd may "
                                    "cover a part of it)")
        return label_map_from_image(image, p, label_names=label_names, reference=reference)
    label = _read_segmentation_file(p, label_names)
    if reference is not None:
        label.image = _onto_reference(label.image, reference, p)
    return label


def label_map_from_image(
    image: sitk.Image,
    where: PathLike,
    *,
    label_names: Mapping[int, str] | None = None,
    reference: Grid | None = None,
) -> LabelMap:
    """A label map from a label volume (a file's, or one handed over in memory, then named by
    ``where``): whole non-negative values, cast to uint8 (uint16 above 255), placed on
    ``reference`` as :func:`read_label_map` does."""
    image = check_volume(image, where)
    array = sitk.GetArrayFromImage(image)
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
            raise InputFileError(where, "holds non-integer values; a label map holds whole numbers")
    if array.size and array.min() < 0:
        raise InputFileError(where, f"holds negative label value {int(array.min())}")
    top = int(array.max()) if array.size else 0
    if top > 65535:
        raise InputFileError(where, f"holds label value {top}; at most 65535 is supported")
    target = sitk.sitkUInt8 if top <= 255 else sitk.sitkUInt16
    if image.GetPixelID() != target:
        image = sitk.Cast(image, target)
    if label_names:
        names = {int(v): n for v, n in label_names.items() if int(v) != 0}
    else:
        names = {int(v): f"label_{int(v)}" for v in np.unique(array) if v != 0}
    if reference is not None:
        image = _onto_reference(image, reference, where)
    return LabelMap(image, names, {v: label_colour(n) for v, n in names.items()})


def _read_segmentation_file(path: Path, label_names: Mapping[int, str] | None) -> LabelMap:
    import slicerio

    try:
        seg = slicerio.read_segmentation(str(path))
    except Exception as error:  # slicerio/pynrrd raise many kinds for a broken file
        raise InputFileError(path, f"cannot be read as a Slicer segmentation ({_first_line(error)})") from None
    voxels = np.asarray(seg["voxels"])
    if voxels.ndim == 3:
        voxels = voxels[None]
    if voxels.ndim != 4:
        raise InputFileError(path, f"segmentation voxels have {voxels.ndim} dimensions; expected 3 or 4")
    segments = list(seg.get("segments", []))

    if label_names:
        by_name = {normalise_name(n): int(v) for v, n in label_names.items() if int(v) != 0}
        unknown = [s["name"] for s in segments if normalise_name(s["name"]) not in by_name]
        if unknown:
            raise InputFileError(path, f"segments {unknown} are not in the label set "
                                       f"{sorted(by_name, key=by_name.get)}")
        values = [by_name[normalise_name(s["name"])] for s in segments]
        names = {int(v): n for v, n in label_names.items() if int(v) != 0}
    else:
        own = [int(s["labelValue"]) for s in segments]
        one_layer = all(int(s.get("layer", 0)) == 0 for s in segments)
        values = own if one_layer and len(set(own)) == len(own) else list(range(1, len(segments) + 1))
        names = {v: s["name"] for v, s in zip(values, segments)}

    masks = [voxels[int(s.get("layer", 0))] == int(s["labelValue"]) for s in segments]
    out = np.zeros(voxels.shape[1:], dtype=np.uint8 if max(values, default=0) <= 255 else np.uint16)
    for index in sorted(range(len(segments)), key=lambda i: -int(masks[i].sum())):  # smaller wins
        out[masks[index]] = values[index]

    ijk_to_lps = np.asarray(seg["ijkToLPS"], dtype=float)
    spacing = np.linalg.norm(ijk_to_lps[:3, :3], axis=0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(out.transpose(2, 1, 0)))  # (I,J,K) -> (K,J,I)
    image.SetSpacing(spacing.tolist())
    image.SetOrigin(ijk_to_lps[:3, 3].tolist())
    image.SetDirection((ijk_to_lps[:3, :3] / spacing[None, :]).flatten().tolist())
    colours = {v: tuple(float(c) for c in s.get("color", label_colour(s["name"]))) for v, s in zip(values, segments)}
    for v, n in names.items():
        colours.setdefault(v, label_colour(n))
    return LabelMap(image, names, colours)


def _onto_reference(label: sitk.Image, reference: Grid, path: PathLike) -> sitk.Image:
    own = Grid.of(label)
    if reference.mismatch(own) is None:
        return reference.apply(label)
    try:
        return embed_in_grid(label, reference)
    except ValueError as error:
        raise InputFileError(path, f"does not lie on its image's grid: {error} "
                                   f"(label grid {own.size}, image grid {reference.size})") from None


def write_label_map(
    label: sitk.Image,
    path: PathLike,
    names: Mapping[int, str] | None = None,
    colours: Mapping[int, tuple[float, float, float]] | None = None,
) -> Path:
    """Write a label map atomically: a Slicer ``.seg.nrrd`` (one segment per named value, with its
    name and colour) or a plain label volume (uint8, or uint16 above 255) for other suffixes."""
    p = Path(path)
    array = sitk.GetArrayFromImage(label)
    top = int(array.max()) if array.size else 0
    pixel = sitk.sitkUInt8 if top <= 255 else sitk.sitkUInt16
    if label.GetPixelID() != pixel:
        label = sitk.Cast(label, pixel)
    if file_suffix(p) != SEGMENTATION_SUFFIX:
        return write_image(label, p)

    import slicerio

    names = dict(names or {int(v): f"label_{int(v)}" for v in np.unique(array) if v != 0})
    missing = sorted(int(v) for v in np.unique(array) if v != 0 and int(v) not in names)
    if missing:
        raise ValueError(f"label values {missing} have no name; pass names for every value")
    grid = Grid.of(label)
    segments = []
    for value, name in sorted(names.items()):
        if int(value) == 0:
            continue
        colour = (colours or {}).get(value) or label_colour(name)
        segments.append({"id": f"Segment_{int(value)}", "name": str(name), "labelValue": int(value), "layer": 0,
                         "color": [float(c) for c in colour], "nameAutoGenerated": False,
                         "colorAutoGenerated": False})
    segmentation = {
        "voxels": np.ascontiguousarray(array.transpose(2, 1, 0)).astype(np.uint8 if top <= 255 else np.uint16),
        "ijkToLPS": grid.index_to_physical_matrix(),
        "segments": segments,
        "containedRepresentationNames": ["Binary labelmap"],
        "masterRepresentation": "Binary labelmap",
        "referenceImageExtentOffset": [0, 0, 0],
    }
    with atomic_path(p) as tmp:
        slicerio.write_segmentation(str(tmp), segmentation)
    return p
