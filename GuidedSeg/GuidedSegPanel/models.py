"""The model bundles in a models folder, as the panel lists them (reads model.json only; no torch).

A bundle is a folder with ``model.json``; the folder itself, its direct sub-folders, and the
``bundle/`` folder of a training run (``<run>/bundle/model.json``, what the panel's Train writes)
are listed. A folder that looks like a bundle but cannot be read is listed with its problem, so
the user learns why it is not offered.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from GuidedSegLib.bundle import METADATA_FILE, read_metadata
from GuidedSegLib.errors import GuidedSegError


@dataclass(frozen=True)
class ModelInfo:
    """One bundle: where it is, what it segments and how well it validated."""

    path: Path
    name: str
    method: str = ""
    labels: dict[int, str] = field(default_factory=dict)  # organ values only, no background
    colours: dict[int, tuple[float, float, float]] = field(default_factory=dict)  # 0..1
    mean_dice: float | None = None
    organ_dice: dict[int, float] = field(default_factory=dict)
    networks: tuple[str, ...] = ()
    created: str = ""
    selection: str = ""  # how the weights were chosen ("final weights: no validation case ...")
    problem: str | None = None  # why it cannot be used; None when it can

    @property
    def usable(self) -> bool:
        return self.problem is None

    @property
    def ensemble_possible(self) -> bool:
        return len(self.networks) > 1

    def title(self) -> str:
        """One line for the model list."""
        if self.problem:
            return f"{self.name} (cannot be used)"
        parts = [p for p in (self.method, f"mean Dice {self.mean_dice:.2f}" if self.mean_dice is not None else "") if p]
        return f"{self.name} ({', '.join(parts)})" if parts else self.name

    def description(self) -> str:
        """Several lines: the organs with their validation Dice, or the problem."""
        if self.problem:
            return self.problem
        from .state import elide_path

        lines = [f"Folder: {elide_path(self.path)}"]
        if self.mean_dice is not None:
            lines.append(f"Validation: mean Dice {self.mean_dice:.3f}")
        if self.selection:
            lines.append(f"Weights: {self.selection}")
        organs = []
        for value, name in sorted(self.labels.items()):
            dice = self.organ_dice.get(value)
            organs.append(f"{value} {name}" + (f" ({dice:.2f})" if dice is not None else ""))
        lines.append("Organs (validation Dice): " + (", ".join(organs) if organs else "none"))
        return "\n".join(lines)


def read_model(path: str | os.PathLike) -> ModelInfo:
    """A :class:`ModelInfo` for one bundle folder; unreadable bundles carry their problem."""
    path = Path(path)
    try:
        metadata = read_metadata(path)
    except GuidedSegError as error:
        return ModelInfo(path=path, name=path.name, problem=str(error))
    try:
        labels = {int(v): str(n) for v, n in metadata["labels"].items() if int(v) != 0}
        if not labels:
            raise ValueError("no organ labels")
        colours = {}
        for value, rgb in (metadata.get("colours") or {}).items():
            colours[int(value)] = tuple(min(1.0, max(0.0, float(c))) for c in rgb[:3])  # RGB, 0..1
        validation = metadata.get("validation") or {}
        mean = validation.get("mean_dice")
        organ_dice = {int(v): float(r["dice"]) for v, r in (validation.get("per_organ") or {}).items()
                      if isinstance(r, dict) and isinstance(r.get("dice"), (int, float))}
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        return ModelInfo(path=path, name=path.name, problem=f"{path / METADATA_FILE}: labels, colours or validation "
                                                           f"cannot be read ({error})")
    name = str(metadata.get("name") or (path.parent.name if path.name == "bundle" else path.name))
    return ModelInfo(path=path, name=name, method=str(metadata.get("method") or ""), labels=labels, colours=colours,
                     mean_dice=float(mean) if isinstance(mean, (int, float)) else None, organ_dice=organ_dice,
                     networks=tuple(metadata.get("networks") or ()), created=str(metadata.get("created") or ""),
                     selection=str((metadata.get("training") or {}).get("selection") or ""))


def list_models(folder: str | os.PathLike | None) -> list[ModelInfo]:
    """Every bundle in ``folder`` (see the module's docstring), sorted by name then path."""
    if not folder:
        return []
    folder = Path(folder)
    if not folder.is_dir():
        return []
    candidates = []
    if (folder / METADATA_FILE).is_file():
        candidates.append(folder)
    for child in sorted(folder.iterdir()):
        if not child.is_dir() or child.name.startswith("."):
            continue  # hidden: e.g. a bundle being written under a temporary name
        if (child / METADATA_FILE).is_file():
            candidates.append(child)
        elif (child / "bundle" / METADATA_FILE).is_file():
            candidates.append(child / "bundle")
    models = [read_model(path) for path in candidates]
    return sorted(models, key=lambda m: (m.name.lower(), str(m.path)))


def folder_problem(folder: str | os.PathLike | None) -> str | None:
    """Why the models folder cannot be listed, or None."""
    if not folder:
        return "Choose a models folder (where model bundles are kept and Train writes new ones)."
    if not Path(folder).is_dir():
        return f"{folder}: the models folder does not exist."
    return None


# ----------------------------------------------------------------------------------------------
# importing a bundle


def bundle_problem(folder: str | os.PathLike) -> str | None:
    """Why ``folder`` is not a usable bundle (model.json, its parts, the weights file's header), or
    None. Reads no weights and imports no torch."""
    import json
    import struct

    from GuidedSegLib.bundle import WEIGHTS_FILE, check_metadata

    folder = Path(folder)
    try:
        metadata = read_metadata(folder)
        check_metadata(folder, metadata)
    except GuidedSegError as error:
        return str(error)
    except (KeyError, TypeError, ValueError) as error:
        return f"{folder / METADATA_FILE}: cannot be read ({error})"
    weights = folder / WEIGHTS_FILE
    try:
        with open(weights, "rb") as stream:
            (size,) = struct.unpack("<Q", stream.read(8))
            if not 0 < size < 100_000_000:
                raise ValueError("bad header size")
            header = json.loads(stream.read(size))
        if not isinstance(header, dict):
            raise ValueError("header is not a table of tensors")
    except FileNotFoundError:
        return f"{weights}: missing (a bundle keeps its weights there)"
    except (OSError, ValueError, struct.error) as error:
        return f"{weights}: not a safetensors weights file ({error})"
    return None


def _find_bundle(root: Path) -> Path | None:
    if (root / METADATA_FILE).is_file():
        return root
    children = [c for c in root.iterdir() if c.is_dir() and not c.name.startswith((".", "__MACOSX"))]
    for child in children:
        for candidate in (child, child / "bundle"):
            if (candidate / METADATA_FILE).is_file():
                return candidate
    return None


def import_bundle(source: str | os.PathLike, models_folder: str | os.PathLike) -> ModelInfo:
    """Copy a bundle (a folder, or a .zip holding one) into the models folder, checked first.

    It is unpacked under a hidden temporary name (which the model list skips), checked with
    :func:`bundle_problem`, then renamed into place; a bundle of the same name already there is
    kept, the new one gets a "-2" (or later) suffix. Raises ValueError naming the source and the
    problem; nothing is left behind then.
    """
    import re
    import secrets
    import shutil
    import zipfile

    source, models_folder = Path(source), Path(models_folder)
    problem = folder_problem(models_folder)
    if problem:
        raise ValueError(problem)
    work = models_folder / f".import-{secrets.token_hex(4)}"
    work.mkdir()
    try:
        if source.is_dir():
            shutil.copytree(source, work / source.name)
        elif source.is_file() and zipfile.is_zipfile(source):
            with zipfile.ZipFile(source) as archive:
                for member in archive.namelist():
                    target = (work / member).resolve()
                    if work.resolve() not in target.parents and target != work.resolve():
                        raise ValueError(f"{source}: the archive holds a path outside itself ({member!r})")
                archive.extractall(work)
        elif source.exists():
            raise ValueError(f"{source}: not a model bundle folder or a .zip of one")
        else:
            raise ValueError(f"{source}: does not exist")
        bundle = _find_bundle(work)
        if bundle is None:
            raise ValueError(f"{source}: holds no {METADATA_FILE}, so it is not a GuidedSeg model bundle")
        problem = bundle_problem(bundle)
        if problem:
            raise ValueError(f"{source}: {problem.replace(str(work), '(import)')}")
        if bundle == work or (bundle.name == "bundle" and bundle.parent == work):
            name = source.stem if source.is_file() else source.name  # model.json at the archive's root
        elif bundle.name == "bundle":
            name = bundle.parent.name  # a training run folder: <run>/bundle
        else:
            name = bundle.name
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-") or "model"
        target, number = models_folder / base, 2
        while target.exists():
            target, number = models_folder / f"{base}-{number}", number + 1
        os.replace(bundle, target)
        return read_model(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
