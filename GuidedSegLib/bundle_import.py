"""Importing a model bundle (a folder, or a .zip holding one) into a models folder, offline,
checked before it is listed. No torch: the weights file's header is read, never its tensors.

Refused, with nothing left in the models folder: a zip member outside the archive's folder (an
absolute path, ``..``, a symbolic link), a file a bundle does not hold (a pickle such as
``checkpoint.pt``, code, anything but model.json, weights.safetensors and text notes), a bundle
of a newer format, a model.json whose parts do not fit, a weights file that is not safetensors.
The bundle is unpacked under a hidden temporary name (which model lists skip), checked, then
renamed into place; a bundle already there is never replaced: the new one gets "-2" (or later).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import stat
import struct
import zipfile
from pathlib import Path

from .bundle import METADATA_FILE, WEIGHTS_FILE, BundleError, check_metadata, read_metadata
from .errors import GuidedSegError

#: what a bundle folder may hold besides folders: its two files, and notes
ALLOWED_FILES = (METADATA_FILE, WEIGHTS_FILE)
ALLOWED_NOTES = re.compile(r"^(README|LICENSE|NOTICE|CHANGES)(\.[A-Za-z]+)?$|\.(md|txt)$", re.IGNORECASE)
MAX_UNPACKED = 8 * 2**30  # bytes: a bigger archive is refused before anything is unpacked


def bundle_problem(folder: str | os.PathLike) -> str | None:
    """Why ``folder`` is not a usable bundle (model.json, its parts, the weights file's header), or
    None. Reads no weights and imports no torch."""
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


def _allowed(name: str) -> bool:
    return name in ALLOWED_FILES or bool(ALLOWED_NOTES.search(name))


def check_archive(source: Path, archive: zipfile.ZipFile) -> None:
    """Refuse an archive with a member outside itself, a link, or a file no bundle holds."""
    total = 0
    for info in archive.infolist():
        name = info.filename
        parts = Path(name.replace("\\", "/")).parts
        if name.startswith(("/", "\\")) or ".." in parts or re.match(r"^[A-Za-z]:", name):
            raise BundleError(source, f"the archive holds a path outside itself ({name!r}); nothing was imported")
        if stat.S_ISLNK(info.external_attr >> 16):
            raise BundleError(source, f"the archive holds a symbolic link ({name!r}); nothing was imported")
        if info.is_dir() or parts and parts[0] == "__MACOSX":
            continue
        if not _allowed(parts[-1]):
            raise BundleError(source, f"the archive holds {name!r}, which a model bundle never holds (only "
                                      f"{', '.join(ALLOWED_FILES)} and text notes; a pickle such as a .pt or "
                                      ".pkl file could run code when loaded); nothing was imported")
        total += info.file_size
    if total > MAX_UNPACKED:
        raise BundleError(source, f"the archive would unpack to {total / 2**30:.1f} GB, more than a bundle "
                                  f"({MAX_UNPACKED / 2**30:.0f} GB at most); nothing was imported")


def _check_folder(source: Path, folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_symlink():
            raise BundleError(source, f"holds a symbolic link ({path.relative_to(folder)}); nothing was imported")
        if path.is_file() and not _allowed(path.name):
            raise BundleError(source, f"holds {path.relative_to(folder)}, which a model bundle never holds (only "
                                      f"{', '.join(ALLOWED_FILES)} and text notes); nothing was imported")


def _find_bundle(root: Path) -> Path | None:
    if (root / METADATA_FILE).is_file():
        return root
    children = [c for c in root.iterdir() if c.is_dir() and not c.name.startswith((".", "__MACOSX"))]
    for child in children:
        for candidate in (child, child / "bundle"):
            if (candidate / METADATA_FILE).is_file():
                return candidate
    return None


def import_bundle(source: str | os.PathLike, models_folder: str | os.PathLike) -> Path:
    """Copy a bundle (a folder, or a .zip holding one) into ``models_folder``, checked first; the
    folder it now lives in. BundleError (a ValueError) naming the source and the problem, and
    nothing left behind, when it is refused."""
    source, models_folder = Path(source), Path(models_folder)
    if not models_folder.is_dir():
        raise BundleError(models_folder, "the models folder does not exist")
    if not source.exists():
        raise BundleError(source, "does not exist")
    is_zip = source.is_file() and zipfile.is_zipfile(source)
    if not source.is_dir() and not is_zip:
        raise BundleError(source, "not a model bundle folder or a .zip of one")
    work = models_folder / f".import-{secrets.token_hex(4)}"
    work.mkdir()
    try:
        if is_zip:
            with zipfile.ZipFile(source) as archive:
                check_archive(source, archive)
                archive.extractall(work)
        else:
            # the folder itself, or a training run's bundle/ in it (nothing deeper, and only the bundle is copied)
            bundle = next((c for c in (source, source / "bundle") if (c / METADATA_FILE).is_file()), None)
            if bundle is None:
                raise BundleError(source, f"holds no {METADATA_FILE}, so it is not a GuidedSeg model bundle")
            _check_folder(source, bundle)
            shutil.copytree(bundle, work / (source.name if bundle == source else "bundle"), symlinks=True)
        bundle = _find_bundle(work)
        if bundle is None:
            raise BundleError(source, f"holds no {METADATA_FILE}, so it is not a GuidedSeg model bundle")
        _check_folder(source, bundle)
        problem = bundle_problem(bundle)
        if problem:
            raise BundleError(source, problem.replace(str(work), "(import)"))
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
        os.rename(bundle, target)  # a rename within one folder; an existing target is never replaced
        return target
    finally:
        shutil.rmtree(work, ignore_errors=True)
