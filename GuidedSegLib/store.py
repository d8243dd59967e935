"""The case store: a Medical Segmentation Decathlon folder that training reads and the panel writes.

Layout (readable by MONAI's ``load_decathlon_datalist`` for the keys "training", "test" and
"unlabeled")::

    dataset.json          labels, modality, cases; the single commit point of every change
    imagesTr/ labelsTr/   labeled cases; labelsTr/<id>.nii.gz is a case's first label version
    labelVersions/<id>/   later label versions (v0002.nii.gz, ...); none is ever overwritten
    imagesUnlabeled/      images without labels
    imagesTs/ labelsTs/   test cases, never used for training or model selection

Each "training" entry carries, besides "image" and "label": "id"; "annotated", the label values
someone contoured or checked (the rest are unknown, not background); "absent", values checked
and found absent; "labelVersion" and "labelHistory" (file, time, source, model, sha256 of every
version). A plain Decathlon store has none of these: a case's annotated set then defaults to the
labels present in its label file, and its first version is the file itself.

Every change writes new files under new names first and then replaces ``dataset.json``
atomically under a lock, so a crash at any point leaves a valid store that refers only to
complete files; at worst an unreferenced file is left behind.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputFileError, StoreError
from .geometry import Grid
from .imageio import (
    LabelMap,
    atomic_path,
    case_id_from_path,
    check_volume,
    label_map_from_image,
    read_grid,
    read_image,
    read_label_map,
    write_image,
    write_label_map,
)
from .labels import normalise_name

DATASET_JSON = "dataset.json"
FORMAT_VERSION = 1
LOCK_FILE = ".guidedseg.lock"
CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
KINDS = ("labeled", "unlabeled", "test")
_LIST_KEY = {"labeled": "training", "unlabeled": "unlabeled", "test": "test"}
_IMAGE_DIR = {"labeled": "imagesTr", "unlabeled": "imagesUnlabeled", "test": "imagesTs"}
_LABEL_DIR = {"labeled": "labelsTr", "test": "labelsTs"}

ImageInput = "str | os.PathLike[str] | sitk.Image"
LabelInput = "str | os.PathLike[str] | sitk.Image | LabelMap"


@dataclass(frozen=True)
class Case:
    """One case of the store. Paths are absolute; ``label`` is the current label version."""

    case_id: str
    kind: str  # "labeled", "unlabeled" or "test"
    image: Path
    label: Path | None
    annotated: tuple[int, ...] | None  # None: not recorded (defaults to the labels in the file)
    absent: tuple[int, ...]
    label_version: int
    history: tuple[dict, ...]


@dataclass(frozen=True)
class Splits:
    """Case ids of a store split for training. Validation is decided per case id by a hash."""

    train: list[str]
    validation: list[str]
    unlabeled: list[str]
    test: list[str]


class CaseStore:
    """A case store folder. Opening reads only ``dataset.json``; nothing is written until asked."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root).resolve()
        if not (self.root / DATASET_JSON).is_file():
            raise StoreError(root, f"is not a case store: no {DATASET_JSON}")
        self._data = self._load()
        self._default_annotated: dict[str, tuple[int, ...]] = {}

    # ------------------------------------------------------------------------------------------
    # creation and basic facts

    @classmethod
    def create(
        cls,
        root: str | os.PathLike[str],
        labels: Mapping[int, str],
        *,
        name: str | None = None,
        modality: str = "CT",
        description: str = "",
        validation_fraction: float = 0.2,
        split_seed: int = 0,
    ) -> CaseStore:
        """Create an empty store. ``labels`` maps values to names; 0 is background."""
        root = Path(root)
        if (root / DATASET_JSON).exists():
            raise StoreError(root, f"already holds a {DATASET_JSON}; open it instead of creating a store")
        names = {int(v): str(n) for v, n in labels.items()}
        names.setdefault(0, "background")
        if names[0].lower() != "background":
            raise StoreError(root, f"label 0 must be background, not {names[0]!r}")
        normalised = [normalise_name(n) for n in names.values()]
        if len(set(normalised)) != len(normalised):
            raise StoreError(root, f"label names must be distinct: {sorted(names.values())}")
        if not 0.0 <= validation_fraction < 1.0:
            raise StoreError(root, f"validation fraction {validation_fraction} must be in [0, 1)")
        data = {
            "name": name or root.name,
            "description": description,
            "tensorImageSize": "3D",
            "modality": {"0": modality},
            "labels": {str(v): names[v] for v in sorted(names)},
            "numTraining": 0,
            "numTest": 0,
            "training": [],
            "test": [],
            "unlabeled": [],
            "guidedseg": {"formatVersion": FORMAT_VERSION, "validationFraction": validation_fraction,
                          "splitSeed": split_seed},
        }
        root.mkdir(parents=True, exist_ok=True)
        for folder in ("imagesTr", "labelsTr", "imagesTs", "labelsTs", "imagesUnlabeled"):
            (root / folder).mkdir(exist_ok=True)
        _write_json(root / DATASET_JSON, data)
        return cls(root)

    @property
    def name(self) -> str:
        return str(self._data.get("name", self.root.name))

    @property
    def labels(self) -> dict[int, str]:
        """Label value -> name, background included."""
        return {int(v): str(n) for v, n in self._data["labels"].items()}

    @property
    def organs(self) -> dict[int, str]:
        """Label value -> name without background."""
        return {v: n for v, n in self.labels.items() if v != 0}

    @property
    def modality(self) -> str:
        modality = self._data.get("modality", {})
        return str(modality.get("0", "CT")) if isinstance(modality, dict) else str(modality)

    def reload(self) -> None:
        self._data = self._load()

    # ------------------------------------------------------------------------------------------
    # reading cases

    def cases(self, kind: str | None = None) -> list[Case]:
        kinds = KINDS if kind is None else (kind,)
        out = []
        for k in kinds:
            if k not in KINDS:
                raise ValueError(f"kind {k!r} is not one of {KINDS}")
            out += [self._case(entry, k) for entry in self._data.get(_LIST_KEY[k], [])]
        return out

    def case(self, case_id: str) -> Case:
        for case in self.cases():
            if case.case_id == case_id:
                return case
        raise StoreError(self.root, f"has no case {case_id!r}")

    def __contains__(self, case_id: str) -> bool:
        return any(c.case_id == case_id for c in self.cases())

    def annotated_labels(self, case: Case | str) -> tuple[int, ...]:
        """The organ values annotated in a labeled or test case (recorded, or present in the file)."""
        case = self.case(case) if isinstance(case, str) else case
        if case.label is None:
            return ()
        if case.annotated is not None:
            return case.annotated
        key = f"{case.case_id}@{case.label}"
        if key not in self._default_annotated:
            values = np.unique(sitk.GetArrayFromImage(read_image(case.label)))
            self._default_annotated[key] = tuple(int(v) for v in values if v != 0)
        return self._default_annotated[key]

    def annotation_counts(self, kind: str = "labeled") -> dict[int, int]:
        """For each organ, in how many cases of ``kind`` it is annotated."""
        counts = {v: 0 for v in self.organs}
        for case in self.cases(kind):
            for value in self.annotated_labels(case):
                if value in counts:
                    counts[value] += 1
        return counts

    def splits(self, validation_fraction: float | None = None, seed: int | None = None) -> Splits:
        """Train / validation / unlabeled / test ids.

        A labeled case is in validation when the hash of (seed, case id) falls below the
        fraction, so adding cases never moves an old case between splits. When no case hashes
        into validation and there are at least two labeled cases, the one with the smallest hash
        validates; a later case can only take its place, never pull a training case across.
        """
        settings = self._data.get("guidedseg", {})
        fraction = float(settings.get("validationFraction", 0.2) if validation_fraction is None else validation_fraction)
        seed = int(settings.get("splitSeed", 0) if seed is None else seed)
        labeled = [c.case_id for c in self.cases("labeled")]
        scores = {cid: _split_hash(seed, cid) for cid in labeled}
        validation = [cid for cid in labeled if scores[cid] < fraction]
        if not validation and len(labeled) >= 2 and fraction > 0:
            validation = [min(labeled, key=scores.get)]
        train = [cid for cid in labeled if cid not in validation]
        return Splits(train, validation, [c.case_id for c in self.cases("unlabeled")],
                      [c.case_id for c in self.cases("test")])

    def read_label(self, case: Case | str) -> LabelMap:
        """The current label of a labeled or test case, on its image's grid, checked against the
        store's label set (InputFileError naming the file otherwise)."""
        case = self.case(case) if isinstance(case, str) else case
        if case.label is None:
            raise StoreError(self.root, f"case {case.case_id!r} has no label")
        return self._read_label(case.label, read_grid(case.image))

    def history(self, case_id: str) -> list[dict]:
        return [dict(h) for h in self.case(case_id).history]

    # ------------------------------------------------------------------------------------------
    # writing cases

    def add_unlabeled(self, image: ImageInput, case_id: str | None = None, *, source: str = "") -> Case:
        """Copy an image into the store as unlabeled data."""
        return self._add("unlabeled", image, None, case_id, None, None, source, None)

    def add_labeled(
        self,
        image: ImageInput,
        label: LabelInput,
        case_id: str | None = None,
        *,
        annotated: Iterable[int | str] | None = None,
        absent: Iterable[int | str] | None = None,
        source: str = "",
        model: str | None = None,
    ) -> Case:
        """Copy an image and its label map into the store as a new labeled (training) case."""
        return self._add("labeled", image, label, case_id, annotated, absent, source, model)

    def add_test(self, image: ImageInput, label: LabelInput | None = None, case_id: str | None = None,
                 *, annotated: Iterable[int | str] | None = None, absent: Iterable[int | str] | None = None,
                 source: str = "") -> Case:
        """Copy a test case into the store; test cases never take part in training or selection.
        ``annotated`` / ``absent`` as for :meth:`add_labeled` (evaluation scores only those organs)."""
        return self._add("test", image, label, case_id, annotated, absent, source, None)

    def ingest_label(
        self,
        case_id: str,
        label: LabelInput,
        *,
        annotated: Iterable[int | str] | None = None,
        absent: Iterable[int | str] | None = None,
        source: str = "",
        model: str | None = None,
    ) -> Case:
        """Store a corrected label for an existing case as its new current version.

        The previous version stays on disk and in the history. An unlabeled case becomes a
        labeled one. ``annotated`` defaults to the organs present in the new label.
        """
        with self._locked() as data:
            kind, entry = self._find(data, case_id)
            if kind == "test":
                raise StoreError(self.root, f"case {case_id!r} is a test case; its reference label is not "
                                            "replaced by ingest")
            image_path = self._abs(entry["image"])
            grid = read_grid(image_path)
            label_map = self._read_label(label, grid)
            annotated_set, absent_set = self._annotation(label_map, annotated, absent, _describe(label))
            version = int(entry.get("labelVersion", 1)) + 1 if kind == "labeled" else 1
            if kind == "labeled":
                target = self.root / "labelVersions" / case_id / f"v{version:04d}.nii.gz"
            else:
                target = self.root / "labelsTr" / f"{case_id}.nii.gz"
            if target.exists():  # left by a crash between writing it and committing dataset.json
                target.unlink()
            write_label_map(label_map.image, target)
            record = _version_record(version, self._rel(target), target, source, model, annotated_set, absent_set)
            if kind == "labeled":
                history = list(entry.get("labelHistory") or [self._original_record(entry)])
                entry.update(label=self._rel(target), labelVersion=version, annotated=list(annotated_set),
                             absent=list(absent_set), labelHistory=history + [record])
            else:  # promote an unlabeled case; its image moves to imagesTr after the commit
                new_image = self.root / "imagesTr" / image_path.name
                _copy_atomic(image_path, new_image)
                data["unlabeled"].remove(entry)
                entry = {"image": self._rel(new_image), "label": self._rel(target), "id": case_id,
                         "annotated": list(annotated_set), "absent": list(absent_set), "labelVersion": 1,
                         "labelHistory": [record]}
                data["training"].append(entry)
        if kind == "unlabeled" and image_path.exists():
            image_path.unlink()
        return self.case(case_id)

    # ------------------------------------------------------------------------------------------
    # checks

    def verify(self) -> list[str]:
        """Problems found in the store (missing or unreadable files, label grids that do not match
        their image, recorded checksums that differ); empty when all is well. Reads headers only,
        plus each recorded label version's checksum."""
        problems = []
        for case in self.cases():
            try:
                grid = read_grid(case.image)
            except InputFileError as error:
                problems.append(str(error))
                continue
            if case.label is None:
                continue
            try:
                mismatch = grid.mismatch(read_grid(case.label))
            except InputFileError as error:
                problems.append(str(error))
                continue
            if mismatch:
                problems.append(f"{case.label}: label grid does not match its image: {mismatch}")
            for record in case.history:
                path = self._abs(record["label"])
                if not path.exists():
                    problems.append(f"{path}: label version {record['version']} of {case.case_id} is missing")
                elif record.get("sha256") and file_sha256(path) != record["sha256"]:
                    problems.append(f"{path}: label version {record['version']} of {case.case_id} was modified")
        return problems

    # ------------------------------------------------------------------------------------------
    # internals

    def _add(self, kind, image, label, case_id, annotated, absent, source, model) -> Case:
        case_id = case_id or (case_id_from_path(image) if not isinstance(image, sitk.Image) else None)
        if not case_id or not CASE_ID.match(case_id):
            raise StoreError(self.root, f"case id {case_id!r} must start with a letter or digit and hold only "
                                        "letters, digits, '.', '_' and '-'")
        volume = check_volume(image, "<image in memory>") if isinstance(image, sitk.Image) else read_image(image)
        grid = Grid.of(volume)
        label_map = None
        if label is not None:
            label_map = self._read_label(label, grid)
        with self._locked() as data:
            if self._find(data, case_id, missing_ok=True)[1] is not None:
                raise StoreError(self.root, f"already has a case {case_id!r}; use ingest to add a label version")
            image_target = self.root / _IMAGE_DIR[kind] / f"{case_id}.nii.gz"
            entry: dict = {"image": self._rel(image_target), "id": case_id}
            if image_target.exists():  # orphan of an earlier crash: never referenced, safe to replace
                image_target.unlink()
            if not isinstance(image, sitk.Image) and str(image).lower().endswith(".nii.gz"):
                _copy_atomic(Path(image), image_target)
            else:
                write_image(volume, image_target)
            if label_map is not None:
                label_target = self.root / _LABEL_DIR[kind] / f"{case_id}.nii.gz"
                if label_target.exists():
                    label_target.unlink()
                write_label_map(label_map.image, label_target)
                entry["label"] = self._rel(label_target)
                if kind == "labeled":
                    annotated_set, absent_set = self._annotation(label_map, annotated, absent, _describe(label))
                    entry.update(annotated=list(annotated_set), absent=list(absent_set), labelVersion=1,
                                 labelHistory=[_version_record(1, entry["label"], label_target, source, model,
                                                               annotated_set, absent_set)])
                elif annotated is not None or absent is not None:  # a test case's stated annotated set
                    annotated_set, absent_set = self._annotation(label_map, annotated, absent, _describe(label))
                    entry.update(annotated=list(annotated_set), absent=list(absent_set))
            elif kind == "labeled":
                raise StoreError(self.root, f"labeled case {case_id!r} needs a label")
            data.setdefault(_LIST_KEY[kind], []).append(entry)
        return self.case(case_id)

    def _read_label(self, label, grid: Grid) -> LabelMap:
        """Read a label onto ``grid`` and check its values against the store's label set."""
        if isinstance(label, (LabelMap, sitk.Image)):
            where = "<label in memory>"
            label_map = label_map_from_image(label.image if isinstance(label, LabelMap) else label, where,
                                             label_names=self.labels, reference=grid)
        else:
            where = str(label)
            label_map = read_label_map(label, label_names=self.labels, reference=grid)
        values = set(label_map.values_present())
        outside = sorted(values - set(self.organs))
        if outside:
            raise InputFileError(where, f"label values {outside} are not in the store's label set "
                                        f"{ {v: n for v, n in self.labels.items()} }")
        return label_map

    def _annotation(self, label_map: LabelMap, annotated, absent, where: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        present = set(label_map.values_present())
        absent_set = set(self._values(absent or (), where))
        annotated_set = set(self._values(annotated, where)) if annotated is not None else present
        if absent_set & present:
            names = [self.labels[v] for v in sorted(absent_set & present)]
            raise InputFileError(where, f"organs {names} are marked absent but are present in the label")
        if absent_set & annotated_set:
            absent_set -= annotated_set
        if not annotated_set and not absent_set:
            raise InputFileError(where, "holds no organ; to store an empty label, say which organs were "
                                        "checked (annotated or absent)")
        return tuple(sorted(annotated_set)), tuple(sorted(absent_set))

    def _values(self, items: Iterable[int | str], where: str) -> list[int]:
        by_name = {normalise_name(n): v for v, n in self.organs.items()}
        values = []
        for item in items:
            value = item if isinstance(item, (int, np.integer)) else by_name.get(normalise_name(item))
            if value is None and isinstance(item, str) and item.strip().isdigit():
                value = int(item)
            if value not in self.organs:
                close = difflib.get_close_matches(normalise_name(str(item)), list(by_name), n=1)
                hint = f"; did you mean {self.organs[by_name[close[0]]]!r}?" if close else ""
                raise InputFileError(where, f"{item!r} is not an organ of the store's label set "
                                            f"{sorted(self.organs.values())}{hint}")
            values.append(int(value))
        return values

    def _case(self, entry: dict | str, kind: str) -> Case:
        if isinstance(entry, str):  # original Decathlon test lists hold bare image paths
            entry = {"image": entry}
        image = self._abs(entry["image"])
        label = self._abs(entry["label"]) if entry.get("label") else None
        annotated = entry.get("annotated")
        history = entry.get("labelHistory") or ([self._original_record(entry)] if label else [])
        return Case(
            case_id=str(entry.get("id") or case_id_from_path(image)),
            kind=kind,
            image=image,
            label=label,
            annotated=tuple(int(v) for v in annotated) if annotated is not None else None,
            absent=tuple(int(v) for v in entry.get("absent", ())),
            label_version=int(entry.get("labelVersion", 1)),
            history=tuple(history),
        )

    @staticmethod
    def _original_record(entry: dict) -> dict:
        return {"version": 1, "label": entry["label"], "source": "original", "time": None, "model": None}

    def _find(self, data: dict, case_id: str, missing_ok: bool = False) -> tuple[str | None, dict | None]:
        for kind in KINDS:
            for entry in data.get(_LIST_KEY[kind], []):
                item = {"image": entry} if isinstance(entry, str) else entry
                if str(item.get("id") or case_id_from_path(item["image"])) == case_id:
                    return kind, entry
        if missing_ok:
            return None, None
        raise StoreError(self.root, f"has no case {case_id!r}")

    def _abs(self, relative: str) -> Path:
        return (self.root / relative).resolve()

    def _rel(self, path: Path) -> str:
        return "./" + Path(os.path.relpath(path, self.root)).as_posix()

    def _load(self) -> dict:
        path = self.root / DATASET_JSON
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise StoreError(path, f"cannot be read as JSON ({error})") from None
        if not isinstance(data, dict) or not isinstance(data.get("labels"), dict):
            raise StoreError(path, "has no 'labels' mapping; a Decathlon dataset.json needs one")
        version = int(data.get("guidedseg", {}).get("formatVersion", FORMAT_VERSION))
        if version > FORMAT_VERSION:
            raise StoreError(path, f"store format {version} is newer than this GuidedSeg reads ({FORMAT_VERSION})")
        for key in ("training", "test", "unlabeled"):
            if not isinstance(data.get(key, []), list):
                raise StoreError(path, f"'{key}' must be a list")
        for entry in data.get("training", []):
            if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
                raise StoreError(path, f"training entry {entry!r} needs 'image' and 'label'")
        return data

    def lock(self, timeout: float = 60.0):
        """The store's write lock as a context manager, for writers of files beside dataset.json
        (the ranking of ``guidedseg suggest``); StoreError when another process holds it longer
        than ``timeout`` seconds."""
        return _file_lock(self.root / LOCK_FILE, timeout)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict]:
        """Hold the store's write lock; yield a fresh copy of dataset.json and commit it on success."""
        with _file_lock(self.root / LOCK_FILE):
            data = self._load()
            yield data
            data["numTraining"] = len(data.get("training", []))
            data["numTest"] = len(data.get("test", []))
            data.setdefault("guidedseg", {}).setdefault("formatVersion", FORMAT_VERSION)
            _write_json(self.root / DATASET_JSON, data)
            self._data = data


# ----------------------------------------------------------------------------------------------
# helpers


def _version_record(version, relative, path, source, model, annotated, absent) -> dict:
    return {"version": version, "label": relative, "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "source": source or "", "model": model, "annotated": list(annotated), "absent": list(absent),
            "sha256": file_sha256(path)}


def _split_hash(seed: int, case_id: str) -> float:
    digest = hashlib.sha256(f"{seed}:{case_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _describe(item) -> str:
    return "<in memory>" if isinstance(item, (sitk.Image, LabelMap)) else str(item)


def _copy_atomic(source: Path, target: Path) -> None:
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)


def _write_json(path: Path, data: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


@contextlib.contextmanager
def _file_lock(path: Path, timeout: float = 60.0) -> Iterator[None]:
    """An exclusive lock between processes (fcntl on POSIX, msvcrt on Windows)."""
    handle = open(path, "a+b")
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                if os.name == "nt":
                    import msvcrt

                    handle.seek(0)
                    msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
                else:
                    import fcntl

                    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise StoreError(path.parent, f"another process has held the store's lock for {timeout:.0f} s") from None
                time.sleep(0.05)
        yield
    finally:
        if os.name == "nt":
            import msvcrt

            with contextlib.suppress(OSError):
                handle.seek(0)
                msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)
        handle.close()  # closing releases an fcntl lock

