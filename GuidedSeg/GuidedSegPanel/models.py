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
    parent: str = ""  # the bundle it was fine-tuned from ("" for a model trained from scratch)
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
                     selection=str((metadata.get("training") or {}).get("selection") or ""),
                     parent=str((metadata.get("parent") or {}).get("path") or ""))


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
    """Why ``folder`` is not a usable bundle, or None (GuidedSegLib.bundle_import; no torch)."""
    from GuidedSegLib.bundle_import import bundle_problem as problem

    return problem(folder)


def import_bundle(source: str | os.PathLike, models_folder: str | os.PathLike) -> ModelInfo:
    """Copy a bundle (a folder, or a .zip holding one) into the models folder, checked first
    (GuidedSegLib.bundle_import, as ``guidedseg bundle import`` does): a zip holding anything but
    a bundle's files (a pickle), a path outside itself or a newer format is refused; a bundle of
    the same name already there is kept, the new one gets a "-2" (or later) suffix. Raises
    ValueError naming the source and the problem; nothing is left behind then."""
    from GuidedSegLib.bundle_import import import_bundle as copy_in

    problem = folder_problem(models_folder)
    if problem:
        raise ValueError(problem)
    return read_model(copy_in(source, models_folder))
