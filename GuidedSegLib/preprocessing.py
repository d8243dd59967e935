"""Preprocessing (orient, clip, resample, normalise) and its inverse back onto a scan's own grid.

All parameters live in one serialisable :class:`PreprocessingPlan`; a model bundle stores it and
inference applies exactly the same steps. :func:`plan_from_dataset` derives a plan from the data
(spacing and intensity handling, as nnU-Net's planning does); :data:`PRESETS` holds named plans,
among them the GuidedNet paper's abdominal-CT settings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import SimpleITK as sitk

from .geometry import Grid

PLAN_VERSION = 1
NORMALISATIONS = ("window", "percentile", "zscore", "none")
AIR_HU = -500.0  # below this a CT voxel is air (or lung); organs are pooled above it for the window


@dataclass(frozen=True)
class PreprocessingPlan:
    """How a volume is prepared for a network. Spacings are (x, y, z) in mm.

    orientation: DICOMOrient code the volume is turned to ("LPI": x to patient left, y to
        posterior, z to inferior).
    target_spacing: voxel size after resampling; None keeps each scan's own spacing.
    clip: intensity window applied first (CT: a HU window); None for MRI.
    normalisation: "window" maps the clip window linearly onto [0, 1], the same mapping for every
        image (planned CT); "percentile" maps the image's own [p_low, p_high] percentiles to
        [0, 1] and clips (the paper); "zscore" subtracts the image's mean and divides by its SD
        (MRI); "none" leaves values.
    """

    modality: str = "CT"
    orientation: str = "LPI"
    target_spacing: tuple[float, float, float] | None = (1.25, 1.25, 2.5)
    clip: tuple[float, float] | None = (-325.0, 325.0)
    normalisation: str = "percentile"
    percentiles: tuple[float, float] = (0.5, 99.5)
    source: str = "guidednet-paper"  # which preset or planning produced it

    def __post_init__(self) -> None:
        if len(self.orientation) != 3 or set(self.orientation.upper()) - set("LRAPSI"):
            raise ValueError(f"orientation {self.orientation!r} is not a 3-letter code such as 'LPI'")
        if self.target_spacing is not None and (len(self.target_spacing) != 3 or min(self.target_spacing) <= 0):
            raise ValueError(f"target_spacing {self.target_spacing} must be three positive numbers (x, y, z)")
        if self.clip is not None and not (len(self.clip) == 2 and self.clip[0] < self.clip[1]):
            raise ValueError(f"clip {self.clip} must be (low, high) with low < high")
        if self.normalisation not in NORMALISATIONS:
            raise ValueError(f"normalisation {self.normalisation!r} is not one of {NORMALISATIONS}")
        if self.normalisation == "window" and self.clip is None:
            raise ValueError("normalisation 'window' needs a clip window (low, high)")
        low, high = self.percentiles
        if not 0 <= low < high <= 100:
            raise ValueError(f"percentiles {self.percentiles} must satisfy 0 <= low < high <= 100")

    def to_dict(self) -> dict:
        data = asdict(self)
        data["version"] = PLAN_VERSION
        return data

    @classmethod
    def from_dict(cls, data: dict) -> PreprocessingPlan:
        data = dict(data)
        version = data.pop("version", PLAN_VERSION)
        if version > PLAN_VERSION:
            raise ValueError(f"preprocessing plan version {version} is newer than this GuidedSeg "
                             f"understands ({PLAN_VERSION}); update GuidedSeg")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown preprocessing settings {unknown}; known: {sorted(known)}")
        for key in ("target_spacing", "clip", "percentiles"):
            if data.get(key) is not None:
                data[key] = tuple(float(v) for v in data[key])
        return cls(**data)


PRESETS: dict[str, PreprocessingPlan] = {
    # GuidedNet paper (FLARE22 abdominal CT), methods.md section 1.6.
    "guidednet-paper": PreprocessingPlan(),
    # MRI: no HU window; per-image percentile normalisation; native spacing unless planned.
    "mri-native": PreprocessingPlan(modality="MRI", target_spacing=None, clip=None, source="mri-native"),
}


# ----------------------------------------------------------------------------------------------
# Planning from data


def plan_from_dataset(
    images: Sequence[sitk.Image],
    labels: Sequence[sitk.Image | None] | None = None,
    modality: str = "CT",
    orientation: str = "LPI",
) -> PreprocessingPlan:
    """Derive a plan from the training images, the way nnU-Net's planning does.

    Spacing: the median spacing of each axis (after orientation); when the coarsest axis is more
    than 3 times the finest, its target is the 10th percentile of that axis instead, so that
    thick-slice scans are not interpolated into many invented slices.
    Intensity: CT is clipped to a window that keeps the organs' soft-tissue contrast
    (:func:`ct_window`), mapped onto [0, 1] the same way for every image (as nnU-Net's CT
    normalisation uses fixed dataset statistics: a given HU value means the same input in every
    case; per-image percentiles would not, when the window's top is rarer than 0.5 % of an image,
    as bone is in head-and-neck CT); MRI and other modalities get no clip and per-image z-score
    normalisation.
    """
    if not images:
        raise ValueError("cannot plan preprocessing from no images")
    spacings = np.array([_oriented_spacing(img, orientation) for img in images])
    target = np.median(spacings, axis=0)
    if target.max() / target.min() > 3.0:
        axis = int(np.argmax(target))
        target[axis] = np.percentile(spacings[:, axis], 10)
    target = tuple(float(round(s, 4)) for s in target)
    if modality.upper() != "CT":
        return PreprocessingPlan(modality=modality, orientation=orientation, target_spacing=target, clip=None,
                                 normalisation="zscore", source="planned")
    low, high = ct_window(images, labels)
    return PreprocessingPlan(modality="CT", orientation=orientation, target_spacing=target,
                             clip=(low, high), normalisation="window", source="planned")


def ct_window(images: Sequence[sitk.Image], labels: Sequence[sitk.Image | None] | None = None,
              percentiles: tuple[float, float] = (2.5, 97.5), margin: float = 1.0) -> tuple[float, float]:
    """A HU window that keeps the soft-tissue contrast of the organs being segmented.

    Voxels are pooled per organ over the cases (of the body, above -500 HU, where no label exists),
    without the air an organ holds (a larynx's lumen, gas in an esophagus: left in, a quarter of the
    larynx's voxels near -1000 HU stretched the window to (-1494, 698) HU on 8 OpenKBP cases).
    A *dense* organ (bone: its median lies above the ``percentiles[1]`` of every other organ's
    voxels pooled, as the mandible does in head-and-neck CT) is left out: it saturates at the top
    of the window and stays the brightest structure. The window is the pooled soft organs'
    ``percentiles``, widened by ``margin`` times its width on each side, so that fat, air and bone
    stay distinct from the organs. Pooling every organ instead gave (-95, 1494) HU on OpenKBP and
    squeezed brainstem, cord and parotids into 9% of the input range; this gives about a third. The
    2.5 / 97.5 % tails leave out bone that a soft organ's contour takes in (2 OpenKBP cases whose
    esophagus crosses a vertebra gave (-433, 960) HU at 1 / 99 %, and (-222, 239) HU here). The
    margin of a full width keeps the window that measured best on issue 18's 3 OpenKBP cases
    ((-227, 208) HU then, (-217, 206) here): half a width, (-147, 136), lost the larynx (19.1 -> 0.0
    test Dice) and 3.8 points of the mean (Testing/BENCHMARKS.md).
    """
    rng = np.random.default_rng(0)
    per_organ: dict[int, list[np.ndarray]] = {}
    for index, image in enumerate(images):
        values = sitk.GetArrayViewFromImage(image)
        label = labels[index] if labels is not None and index < len(labels) else None
        if label is None:
            groups = {0: values[values > AIR_HU]}
        else:
            classes = sitk.GetArrayViewFromImage(label)
            groups = {int(k): _tissue(values[classes == k]) for k in np.unique(classes) if k != 0}
        for organ, inside in groups.items():
            if inside.size:
                per_organ.setdefault(organ, []).append(rng.choice(inside, size=min(inside.size, 100_000), replace=False))
    if not per_organ:
        flat = np.concatenate([sitk.GetArrayViewFromImage(i).ravel() for i in images])
        per_organ = {0: [flat]}
    pools = {k: np.concatenate(v).astype(np.float64) for k, v in per_organ.items()}
    dense = set()
    if len(pools) > 1:
        for organ, pool in pools.items():
            others = np.concatenate([v for k, v in pools.items() if k != organ])
            if np.median(pool) > np.percentile(others, percentiles[1]):
                dense.add(organ)
    soft = np.concatenate([v for k, v in pools.items() if k not in dense] or list(pools.values()))
    low, high = np.percentile(soft, percentiles)
    if high <= low:
        high = low + 1.0
    pad = margin * (high - low)
    return float(round(low - pad, 1)), float(round(high + pad, 1))


def _tissue(inside: np.ndarray) -> np.ndarray:
    """An organ's voxels without the air it holds (below -500 HU: a larynx's lumen, gas in an
    esophagus), unless the organ is mostly air (a lung, an airway), whose contrast is in that range."""
    if inside.size and np.median(inside) > AIR_HU:
        return inside[inside > AIR_HU]
    return inside


def _oriented_spacing(image: sitk.Image, orientation: str) -> tuple[float, float, float]:
    """Spacing an image has once turned to ``orientation`` (axes may be permuted)."""
    direction = np.abs(np.reshape(image.GetDirection(), (3, 3)))
    oriented = np.abs(np.reshape(_orientation_direction(orientation), (3, 3)))
    # Column j of direction is image axis j; match each oriented axis to its closest image axis.
    order = [int(np.argmax(oriented[:, a] @ direction)) for a in range(3)]
    return tuple(float(image.GetSpacing()[i]) for i in order)


def _orientation_direction(orientation: str) -> tuple[float, ...]:
    return sitk.DICOMOrientImageFilter.GetDirectionCosinesFromOrientation(orientation.upper())


# ----------------------------------------------------------------------------------------------
# Forward


@dataclass
class Preprocessed:
    """A preprocessed volume (float32) and label (uint8/16, or None) plus the grid they came from."""

    image: sitk.Image
    label: sitk.Image | None
    source: Grid = field(repr=False)

    @property
    def grid(self) -> Grid:
        return Grid.of(self.image)


def preprocess(image: sitk.Image, plan: PreprocessingPlan, label: sitk.Image | None = None) -> Preprocessed:
    """Orient, clip, resample (linear for the image, nearest for the label) and normalise."""
    source = Grid.of(image)
    oriented = sitk.DICOMOrient(image, plan.orientation.upper())
    oriented = sitk.Cast(oriented, sitk.sitkFloat32)
    if plan.clip is not None:
        oriented = sitk.Clamp(oriented, sitk.sitkFloat32, float(plan.clip[0]), float(plan.clip[1]))
    target_grid = resampled_grid(Grid.of(oriented), plan.target_spacing)
    background = float(plan.clip[0]) if plan.clip is not None else float(np.min(sitk.GetArrayViewFromImage(oriented)))
    resampled = resample(oriented, target_grid, sitk.sitkLinear, background)
    normalised = normalise(resampled, plan)
    out_label = None
    if label is not None:
        oriented_label = sitk.DICOMOrient(label, plan.orientation.upper())
        out_label = resample(oriented_label, target_grid, sitk.sitkNearestNeighbor, 0)
    return Preprocessed(normalised, out_label, source)


def resampled_grid(grid: Grid, spacing: Sequence[float] | None) -> Grid:
    """The grid covering the same box as ``grid`` with voxels of ``spacing`` (None: unchanged).

    The outer voxel edges are kept (not the first voxel centre), so up- and down-sampling
    stay centred on the same physical block.
    """
    if spacing is None:
        return grid
    old_spacing = np.asarray(grid.spacing)
    new_spacing = np.asarray(spacing, dtype=float)
    extent = np.asarray(grid.size) * old_spacing
    size = np.maximum(1, np.round(extent / new_spacing)).astype(int)
    direction = np.reshape(grid.direction, (3, 3))
    corner = np.asarray(grid.origin) - direction @ (old_spacing / 2)  # outer edge of voxel 0
    origin = corner + direction @ (new_spacing / 2)
    return Grid(tuple(int(s) for s in size), tuple(float(s) for s in new_spacing),
                tuple(float(o) for o in origin), grid.direction)


def resample(image: sitk.Image, grid: Grid, interpolator: int, default_value: float = 0.0) -> sitk.Image:
    """Resample ``image`` onto ``grid`` in physical space (identity transform)."""
    if Grid.of(image) == grid:
        return image
    return sitk.Resample(image, list(grid.size), sitk.Transform(), interpolator, grid.origin, grid.spacing,
                         grid.direction, float(default_value), image.GetPixelID())


def normalise(image: sitk.Image, plan: PreprocessingPlan) -> sitk.Image:
    """Apply the plan's intensity normalisation to a float32 image."""
    if plan.normalisation == "none":
        return image
    array = sitk.GetArrayFromImage(image)
    if plan.normalisation in ("window", "percentile"):
        low, high = plan.clip if plan.normalisation == "window" else np.percentile(array, plan.percentiles)
        scale = high - low if high > low else 1.0
        array = np.clip((array - low) / scale, 0.0, 1.0, out=array)
    else:  # zscore
        sd = float(array.std())
        array = (array - float(array.mean())) / (sd if sd > 0 else 1.0)
    out = sitk.GetImageFromArray(array.astype(np.float32, copy=False))
    out.CopyInformation(image)
    return out


# ----------------------------------------------------------------------------------------------
# Inverse


def restore_label(label: sitk.Image, source: Grid) -> sitk.Image:
    """Bring a label map from preprocessed space back onto the input's own grid (nearest)."""
    return resample(label, source, sitk.sitkNearestNeighbor, 0)


def restore_probabilities(
    probabilities: np.ndarray,
    grid: Grid,
    source: Grid,
    slab_voxels: int = 1 << 21,
    progress: Callable[[float], None] | None = None,
) -> sitk.Image:
    """Turn class probabilities in preprocessed space into a label map on the input's own grid.

    ``probabilities``: (C, z, y, x) class probabilities (summing to 1 per voxel) on ``grid``, any
    float dtype (float16 halves memory).
    The input grid is filled slab by slab (about ``slab_voxels`` voxels each): for each slab,
    each class is resampled linearly from just the block of ``grid`` that covers it, and the
    arg-max kept as it goes. Memory therefore stays at a few slabs whatever the scan's size and
    the number of classes. Points beyond the outermost voxel centres take the nearest value.
    Returns class indices as uint8 (uint16 if C > 256).
    """
    channels = probabilities.shape[0]
    if channels == 0:
        raise ValueError("no probability channels given")
    if tuple(probabilities.shape[1:]) != tuple(grid.size[::-1]):
        raise ValueError(f"probabilities of shape {probabilities.shape[1:]} do not fit grid size {grid.size[::-1]}")
    nx, ny, nz = source.size
    dtype = np.uint8 if channels <= 256 else np.uint16
    label = np.zeros((nz, ny, nx), dtype=dtype)
    to_grid = np.linalg.inv(grid.index_to_physical_matrix()) @ source.index_to_physical_matrix()
    grid_matrix = grid.index_to_physical_matrix()
    slab = max(1, slab_voxels // max(1, nx * ny))
    resampler = sitk.ResampleImageFilter()
    resampler.SetInterpolator(sitk.sitkLinear)
    resampler.SetUseNearestNeighborExtrapolator(True)
    for z0 in range(0, nz, slab):
        z1 = min(nz, z0 + slab)
        origin = (source.index_to_physical_matrix() @ np.array([0.0, 0.0, z0, 1.0]))[:3]
        resampler.SetReferenceImage(Grid((nx, ny, z1 - z0), source.spacing, tuple(origin), source.direction)
                                    .reference_image())
        corners = np.array([[i, j, k, 1.0] for i in (0, nx - 1) for j in (0, ny - 1) for k in (z0, z1 - 1)])
        inside = (to_grid @ corners.T)[:3]  # continuous (x, y, z) indices in ``grid``
        lo = np.clip(np.floor(inside.min(axis=1)).astype(int) - 1, 0, np.asarray(grid.size) - 1)
        hi = np.clip(np.ceil(inside.max(axis=1)).astype(int) + 2, lo + 1, np.asarray(grid.size))
        block_origin = (grid_matrix @ np.append(lo, 1.0))[:3]
        best = None
        for value in range(channels):
            block = probabilities[value, lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]]
            # Interpolated probabilities still sum to 1, so the winner has at least 1/C: a class
            # that stays below that over the whole block can never win here (most organs in most
            # slabs), and resampling it is skipped.
            if best is not None and float(block.max()) < 1.0 / channels - 0.01:
                continue
            block = np.asarray(block, dtype=np.float32)
            moving = sitk.GetImageFromArray(block)
            moving.SetSpacing(grid.spacing)
            moving.SetOrigin(tuple(block_origin))
            moving.SetDirection(grid.direction)
            upsampled = sitk.GetArrayFromImage(resampler.Execute(moving))
            if best is None:
                best = upsampled
                continue
            better = upsampled > best
            best[better] = upsampled[better]
            label[z0:z1][better] = value
        if progress is not None:
            progress(z1 / nz)
    return source.apply(sitk.GetImageFromArray(label))
