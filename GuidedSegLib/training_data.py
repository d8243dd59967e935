"""Training data from a case store: preprocessed once into a cache, then cropped per iteration.

Every case is read, checked and preprocessed with the same :func:`preprocess` that inference
uses, then kept as ``.npy`` arrays (memory-mapped while training) under a cache folder keyed by
the plan, so a second run or a resumed run starts at once and a new label version is noticed.

Crops are drawn by :class:`CropSampler` from a generator seeded by (seed, iteration): the batch
of an iteration is a pure function of its number. That makes ``--resume`` continue with the
very crops an uninterrupted run would have used, and lets each DDP process take its share of
one global batch. Labeled and unlabeled crops come from two streams; a labeled crop is centred
on a voxel of a random annotated organ with probability ``foreground`` (rare organs are seen as
often as large ones), elsewhere uniformly. Each crop is mirrored along each of ``flip_axes``
with probability 1/2 (the trainer leaves out the left-right axis when organs have a side).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from monai.data import set_track_meta
from monai.transforms import Flip, SpatialPad

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


class CropSampler:
    """Draws the crops of each iteration (see the module docstring).

    ``patch`` is (z, y, x); batch sizes are global (over all DDP processes).
    """

    def __init__(self, labeled: Sequence[PreparedCase], unlabeled: Sequence[PreparedCase], patch: Sequence[int],
                 labeled_batch: int, unlabeled_batch: int, foreground: float = 0.33, seed: int = 0,
                 flip_axes: Sequence[int] = (0, 1, 2)):
        if not labeled:
            raise ValueError("no labeled training case to sample from")
        self.labeled, self.unlabeled = list(labeled), list(unlabeled)
        self.patch = tuple(int(p) for p in patch)
        self.labeled_batch = labeled_batch
        self.unlabeled_batch = unlabeled_batch if self.unlabeled else 0
        self.foreground, self.seed = foreground, seed
        self.flip_axes = tuple(sorted(int(a) for a in flip_axes))
        self._pad = SpatialPad(self.patch, method="symmetric")
        set_track_meta(False)  # plain tensors out of MONAI's transforms

    def plan(self, iteration: int) -> list[tuple[str, int, tuple[int, int, int], tuple[int, ...]]]:
        """The global batch of ``iteration``: (stream, case index, crop start, flipped axes) per crop."""
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
                flips = tuple(int(a) for a in np.flatnonzero(rng.random(3) < 0.5) if a in self.flip_axes)
                crops.append((stream, index, start, flips))
        return crops

    def batch(self, iteration: int, rank: int = 0, world: int = 1) -> dict[str, torch.Tensor]:
        """This process's share of the global batch: images ``(b, 1, *patch)``, labels
        ``(b_l, *patch)`` long, annotated / absent ``(b_l, K)`` bool."""
        crops = self.plan(iteration)
        labeled = [c for c in crops if c[0] == "labeled"]
        unlabeled = [c for c in crops if c[0] == "unlabeled"]
        for count in (len(labeled), len(unlabeled)):
            if count % world:
                raise ValueError(f"batch size {count} is not divisible by the {world} processes")
        share = lambda items: items[rank * len(items) // world:(rank + 1) * len(items) // world]
        images, labels, annotated, absent = [], [], [], []
        for stream, index, start, flips in share(labeled) + share(unlabeled):
            case = (self.labeled if stream == "labeled" else self.unlabeled)[index]
            window = tuple(slice(s, s + p) for s, p in zip(start, self.patch))
            image = self._augment(np.asarray(case.image()[window], dtype=np.float32)[None], flips, case.background)
            images.append(image)
            if stream == "labeled":
                labels.append(self._augment(case.label(window)[None].astype(np.int64), flips, 0)[0])
                annotated.append(torch.from_numpy(case.annotated))
                absent.append(torch.from_numpy(case.absent))
        k = len(self.labeled[0].annotated)
        return {
            "image": torch.stack(images),
            "labels": torch.stack(labels) if labels else torch.zeros((0, *self.patch), dtype=torch.long),
            "annotated": torch.stack(annotated) if annotated else torch.zeros((0, k), dtype=torch.bool),
            "absent": torch.stack(absent) if absent else torch.zeros((0, k), dtype=torch.bool),
        }

    def _augment(self, array: np.ndarray, flips: tuple[int, ...], pad_value: float) -> torch.Tensor:
        tensor = torch.from_numpy(np.array(array, copy=True))  # memory-mapped slices are read-only
        if tuple(tensor.shape[1:]) != self.patch:
            tensor = self._pad(tensor, value=pad_value)
        if flips:
            tensor = Flip(spatial_axis=list(flips))(tensor)
        return torch.as_tensor(tensor).contiguous()


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
