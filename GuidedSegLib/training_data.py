"""Training data from a case store: preprocessed once into a cache, then cropped per iteration.

Every case is read, checked and preprocessed with the same :func:`preprocess` that inference
uses, then kept as ``.npy`` arrays (memory-mapped while training) under a cache folder keyed by
the plan, so a second run or a resumed run starts at once and a new label version is noticed.

Crops are drawn by :class:`CropSampler` from a generator seeded by (seed, iteration): the batch
of an iteration is a pure function of its number. That makes ``--resume`` continue with the
very crops an uninterrupted run would have used, and lets each DDP process take its share of
one global batch. Labeled and unlabeled crops come from two streams; a labeled crop is centred
on a voxel of a random annotated organ with probability ``foreground`` (rare organs are seen as
often as large ones), elsewhere uniformly. Each crop is then augmented as :class:`Augmentation`
says, only in ways that give plausible anatomy: a left-right mirror that swaps paired organs
(left parotid <-> right parotid), small rotations and scalings, and intensity scale, shift,
gamma and noise. Plain flips along other axes are an option for data without a fixed orientation.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from monai.data import set_track_meta
from monai.transforms import Affine, Flip, SpatialPad

from .imageio import atomic_path, read_image
from .preprocessing import PreprocessingPlan, preprocess
from .store import Case, CaseStore

CACHE_VERSION = 1
LOCATIONS_PER_CLASS = 20_000


@dataclass
class PreparedCase:
    """A preprocessed case in the cache. ``annotated``/``absent`` are ``(K,)`` bool over classes."""

    case_id: str
    image_file: Path
    label_file: Path | None
    shape: tuple[int, int, int]  # (z, y, x)
    background: float  # the smallest intensity, used to pad crops
    annotated: np.ndarray
    absent: np.ndarray
    locations: dict[int, np.ndarray]  # class index -> (n, 3) voxel indices (z, y, x)

    def image(self) -> np.ndarray:
        return np.load(self.image_file, mmap_mode="r")

    def label(self, window: tuple[slice, ...] = (...,)) -> np.ndarray:
        """Class indices of ``window`` (default: all) with unannotated organs set to background."""
        label = np.array(np.load(self.label_file, mmap_mode="r")[window])
        if not self.annotated.all():
            label[~self.annotated[label]] = 0
        return label


class TrainingData:
    """Prepares store cases for training under one preprocessing plan.

    Classes are ``class_values`` (default: all the store's label values) in ascending order, class
    0 = background = value 0; voxels of a store organ left out of ``class_values`` read as background.
    ``partial_labels``: True reads a case's unannotated organs as unknown (methods.md 3);
    False is the plain reading (everything not labeled is background), kept for comparison.
    """

    def __init__(self, store: CaseStore, plan: PreprocessingPlan, cache: Path, partial_labels: bool = True,
                 class_values: Sequence[int] | None = None):
        self.store, self.plan, self.partial_labels = store, plan, partial_labels
        self.class_values = sorted(set(class_values if class_values is not None else store.labels) | {0})
        unknown = set(self.class_values) - set(store.labels)
        if unknown:
            raise ValueError(f"{store.root}: classes {sorted(unknown)} are not in the store's label set")
        key = json.dumps({"plan": plan.to_dict(), "classes": self.class_values, "v": CACHE_VERSION}, sort_keys=True)
        self.cache = Path(cache) / hashlib.sha1(key.encode()).hexdigest()[:12]
        self.lookup = np.zeros(max(store.labels) + 1, dtype=np.uint8)
        for index, value in enumerate(self.class_values):
            self.lookup[value] = index

    @property
    def num_classes(self) -> int:
        return len(self.class_values)

    def prepare(self, cases: Sequence[Case], progress: Callable[[int, int, str], None] | None = None) -> list[PreparedCase]:
        out = []
        for index, case in enumerate(cases):
            if progress:
                progress(index, len(cases), case.case_id)
            out.append(self._prepare(case))
        if progress:
            progress(len(cases), len(cases), "")
        return out

    def _prepare(self, case: Case) -> PreparedCase:
        self.cache.mkdir(parents=True, exist_ok=True)
        stem = self.cache / case.case_id
        meta_file = stem.with_name(case.case_id + ".json")
        fingerprint = {"image": _fingerprint(case.image), "label": _fingerprint(case.label) if case.label else None}
        meta = _read_json(meta_file)
        if meta is None or meta.get("fingerprint") != fingerprint:
            meta = self._preprocess(case, stem, fingerprint)
            with atomic_path(meta_file) as tmp:
                tmp.write_text(json.dumps(meta))
        annotated = np.ones(self.num_classes, dtype=bool)
        absent = np.zeros(self.num_classes, dtype=bool)
        if case.label is not None:
            absent_values = set(case.absent)
            absent[[i for i, v in enumerate(self.class_values) if v in absent_values]] = True
            if self.partial_labels:
                known = set(self.store.annotated_labels(case)) | absent_values | {0}
                annotated = np.array([v in known for v in self.class_values])
        locations = {}
        if case.label is not None:
            with np.load(stem.with_name(case.case_id + ".locations.npz")) as found:
                locations = {int(k): found[k] for k in found.files if annotated[int(k)]}
        return PreparedCase(case.case_id, stem.with_name(case.case_id + ".image.npy"),
                            stem.with_name(case.case_id + ".label.npy") if case.label else None,
                            tuple(meta["shape"]), float(meta["background"]), annotated, absent, locations)

    def _preprocess(self, case: Case, stem: Path, fingerprint: dict) -> dict:
        image = read_image(case.image)
        label = None
        if case.label is not None:
            values = self.store.read_label(case).image  # on the image grid, values checked
            label = sitk.GetImageFromArray(self.lookup[sitk.GetArrayFromImage(values)])
            label.CopyInformation(values)
        result = preprocess(image, self.plan, label)
        array = sitk.GetArrayFromImage(result.image).astype(np.float32, copy=False)
        _save_npy(stem.with_name(case.case_id + ".image.npy"), array)
        if result.label is not None:
            classes = sitk.GetArrayFromImage(result.label).astype(np.uint8)
            _save_npy(stem.with_name(case.case_id + ".label.npy"), classes)
            rng = np.random.default_rng(0)
            found = {}
            for index in range(1, self.num_classes):
                where = np.argwhere(classes == index).astype(np.int32)
                if len(where) > LOCATIONS_PER_CLASS:
                    where = where[rng.choice(len(where), LOCATIONS_PER_CLASS, replace=False)]
                if len(where):
                    found[str(index)] = where
            with atomic_path(stem.with_name(case.case_id + ".locations.npz")) as tmp:
                with open(tmp, "wb") as handle:
                    np.savez(handle, **found)
        return {"fingerprint": fingerprint, "shape": list(array.shape), "background": float(array.min())}


@dataclass(frozen=True)
class Augmentation:
    """How crops are augmented. Axes are array axes (z, y, x).

    mirror_axis: the left-right axis, mirrored with probability 1/2; ``permutation`` (class index ->
        its other-side twin) relabels the crop and its annotated / absent sets, so a mirrored left
        parotid is labeled right. None: no left-right mirror.
    flip_axes: other axes mirrored plainly with probability 1/2 each (data without a fixed
        orientation; a flipped head-and-neck CT is anatomy that never occurs).
    rotate, scale: largest rotation about each axis (radians) and relative zoom, applied together
        with probability ``spatial_p``.
    intensity_p: probability of each intensity change (scale, shift, gamma, noise); 0 turns them off.
    """

    mirror_axis: int | None = None
    permutation: tuple[int, ...] | None = None
    flip_axes: tuple[int, ...] = ()
    rotate: float = 0.26  # 15 degrees
    scale: float = 0.15
    spatial_p: float = 0.3
    intensity_p: float = 0.15

    @classmethod
    def none(cls) -> Augmentation:
        return cls(rotate=0.0, scale=0.0, spatial_p=0.0, intensity_p=0.0)


@dataclass(frozen=True)
class Crop:
    """One crop of an iteration's batch and everything random about it."""

    stream: str  # "labeled" or "unlabeled"
    index: int  # case index in its stream
    start: tuple[int, int, int]  # (z, y, x)
    flips: tuple[int, ...] = ()  # axes mirrored; the mirror axis here means paired classes swap too
    rotation: tuple[float, float, float] | None = None  # radians; None: no spatial transform
    zoom: tuple[float, float, float] = (1.0, 1.0, 1.0)
    intensity: dict = field(default_factory=dict)  # name -> parameter of each intensity change applied


class CropSampler:
    """Draws the crops of each iteration (see the module docstring).

    ``patch`` is (z, y, x); batch sizes are global (over all DDP processes).
    """

    def __init__(self, labeled: Sequence[PreparedCase], unlabeled: Sequence[PreparedCase], patch: Sequence[int],
                 labeled_batch: int, unlabeled_batch: int, foreground: float = 0.33, seed: int = 0,
                 augmentation: Augmentation | None = None):
        if not labeled:
            raise ValueError("no labeled training case to sample from")
        self.labeled, self.unlabeled = list(labeled), list(unlabeled)
        self.patch = tuple(int(p) for p in patch)
        self.labeled_batch = labeled_batch
        self.unlabeled_batch = unlabeled_batch if self.unlabeled else 0
        self.foreground, self.seed = foreground, seed
        self.augmentation = augmentation if augmentation is not None else Augmentation.none()
        if self.augmentation.mirror_axis is not None and self.augmentation.permutation is None:
            raise ValueError("a left-right mirror needs the class permutation that swaps paired organs")
        self._pad = SpatialPad(self.patch, method="symmetric")
        set_track_meta(False)  # plain tensors out of MONAI's transforms

    def plan(self, iteration: int) -> list[Crop]:
        """The global batch of ``iteration``: one :class:`Crop` per image, a pure function of
        (seed, iteration)."""
        rng = np.random.default_rng([self.seed, iteration])
        crops = []
        for stream, cases, count in (("labeled", self.labeled, self.labeled_batch),
                                     ("unlabeled", self.unlabeled, self.unlabeled_batch)):
            for _ in range(count):
                index = int(rng.integers(len(cases)))
                case = cases[index]
                centre = None
                if stream == "labeled" and rng.random() < self.foreground and case.locations:
                    classes = sorted(case.locations)
                    where = case.locations[classes[int(rng.integers(len(classes)))]]
                    centre = where[int(rng.integers(len(where)))]
                if centre is None:
                    centre = [int(rng.integers(s)) for s in case.shape]
                start = tuple(int(min(max(c - p // 2, 0), max(s - p, 0)))
                              for c, p, s in zip(centre, self.patch, case.shape))
                crops.append(Crop(stream, index, start, *self._draw(rng)))
        return crops

    def _draw(self, rng: np.random.Generator):
        a = self.augmentation
        coin = rng.random(3) < 0.5
        flips = [ax for ax in a.flip_axes if coin[ax]]
        if a.mirror_axis is not None and coin[a.mirror_axis]:
            flips.append(a.mirror_axis)
        rotation, zoom = None, (1.0, 1.0, 1.0)
        if rng.random() < a.spatial_p:
            rotation = tuple(float(v) for v in rng.uniform(-a.rotate, a.rotate, 3))
            zoom = (float(rng.uniform(1 - a.scale, 1 + a.scale)),) * 3
        intensity = {}
        draws = rng.random(5)
        if draws[0] < a.intensity_p:
            intensity["scale"] = float(rng.uniform(0.75, 1.25))  # brightness, multiplicative
        if draws[1] < a.intensity_p:
            intensity["shift"] = float(rng.uniform(-0.1, 0.1))  # in units of the crop's SD
        if draws[2] < a.intensity_p:
            intensity["contrast"] = float(rng.uniform(0.75, 1.25))  # about the mean, within the range
        if draws[3] < 2 * a.intensity_p:
            intensity["gamma"] = float(rng.uniform(0.7, 1.5))
        if draws[4] < a.intensity_p:
            intensity["noise"] = float(rng.uniform(0.0, 0.1))  # SD, in units of the crop's SD
            intensity["noise_seed"] = int(rng.integers(2**31))
        return tuple(sorted(flips)), rotation, zoom, intensity

    def batch(self, iteration: int, rank: int = 0, world: int = 1) -> dict[str, torch.Tensor]:
        """This process's share of the global batch: images ``(b, 1, *patch)``, labels
        ``(b_l, *patch)`` long, annotated / absent ``(b_l, K)`` bool."""
        crops = self.plan(iteration)
        labeled = [c for c in crops if c.stream == "labeled"]
        unlabeled = [c for c in crops if c.stream == "unlabeled"]
        for count in (len(labeled), len(unlabeled)):
            if count % world:
                raise ValueError(f"batch size {count} is not divisible by the {world} processes")
        share = lambda items: items[rank * len(items) // world:(rank + 1) * len(items) // world]
        images, labels, annotated, absent = [], [], [], []
        for crop in share(labeled) + share(unlabeled):
            case = (self.labeled if crop.stream == "labeled" else self.unlabeled)[crop.index]
            window = tuple(slice(s, s + p) for s, p in zip(crop.start, self.patch))
            image = self._spatial(np.asarray(case.image()[window], dtype=np.float32)[None], crop, case.background,
                                  "bilinear")
            images.append(_intensity(image, crop.intensity))
            if crop.stream == "labeled":
                label = self._spatial(case.label(window)[None].astype(np.float32), crop, 0, "nearest")[0].long()
                known, gone = torch.from_numpy(case.annotated), torch.from_numpy(case.absent)
                if self.augmentation.mirror_axis in crop.flips:  # the left organ is now on the right
                    swap = torch.tensor(self.augmentation.permutation)
                    label, known, gone = swap[label], known[swap], gone[swap]
                labels.append(label.contiguous())
                annotated.append(known)
                absent.append(gone)
        k = len(self.labeled[0].annotated)
        return {
            "image": torch.stack(images),
            "labels": torch.stack(labels) if labels else torch.zeros((0, *self.patch), dtype=torch.long),
            "annotated": torch.stack(annotated) if annotated else torch.zeros((0, k), dtype=torch.bool),
            "absent": torch.stack(absent) if absent else torch.zeros((0, k), dtype=torch.bool),
        }

    def _spatial(self, array: np.ndarray, crop: Crop, pad_value: float, mode: str) -> torch.Tensor:
        """Pad to the patch, mirror, then rotate and zoom about the crop's centre; ``(1, *patch)``."""
        tensor = torch.from_numpy(np.array(array, copy=True))  # memory-mapped slices are read-only
        if tuple(tensor.shape[1:]) != self.patch:
            tensor = self._pad(tensor, value=pad_value)
        if crop.flips:
            tensor = Flip(spatial_axis=list(crop.flips))(tensor)
        if crop.rotation is not None:
            tensor = Affine(rotate_params=crop.rotation, scale_params=crop.zoom, padding_mode="border",
                            mode=mode, image_only=True)(tensor)
        return torch.as_tensor(tensor).contiguous()


def _intensity(image: torch.Tensor, changes: dict) -> torch.Tensor:
    """The intensity changes a :class:`Crop` drew, in a fixed order, on a ``(1, *patch)`` image."""
    if not changes:
        return image
    sd = float(image.std()) or 1.0
    if "scale" in changes:
        image = image * changes["scale"]
    if "shift" in changes:
        image = image + changes["shift"] * sd
    if "contrast" in changes:
        mean = image.mean()
        image = ((image - mean) * changes["contrast"] + mean).clamp(float(image.min()), float(image.max()))
    if "gamma" in changes:
        lo, hi = float(image.min()), float(image.max())
        if hi > lo:
            image = ((image - lo) / (hi - lo)) ** changes["gamma"] * (hi - lo) + lo
    if "noise" in changes:
        generator = torch.Generator().manual_seed(changes["noise_seed"])
        image = image + torch.randn(image.shape, generator=generator) * (changes["noise"] * sd)
    return image.contiguous()


class IterationBatches(torch.utils.data.Dataset):
    """Map-style view of iterations ``start..stop-1`` for a DataLoader (``batch_size=None``)."""

    def __init__(self, sampler: CropSampler, start: int, stop: int, rank: int = 0, world: int = 1):
        self.sampler, self.start, self.stop, self.rank, self.world = sampler, start, stop, rank, world

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.sampler.batch(self.start + index, self.rank, self.world)


def _fingerprint(path: Path) -> str:
    stat = os.stat(path)
    return f"{stat.st_size}-{stat.st_mtime_ns}"


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array)
