"""Where a model came from: its parent bundle, its ancestors' validation metrics, and the labeled
cases (with label versions) it was trained on. No torch here.

A fine-tuned bundle's model.json holds::

    "parent":  {"id", "path", "name", "method", "created", "validation": {"mean_dice", "per_organ"}}
    "lineage": [ancestor records like "parent", oldest first; the last one is the parent]
    "training": {..., "cases": [{"case", "split", "label_version", "sha256", "source"}, ...]}

A bundle's id is the first 16 hex digits of the SHA-256 of its model.json and weights, so two
bundles with the same id hold the same model; ``guidedseg bundle history`` prints the chain.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from .bundle import METADATA_FILE, WEIGHTS_FILE, BundleError, read_metadata
from .labels import normalise_name


def bundle_hash(folder: str | os.PathLike) -> str:
    """SHA-256 (hex) over a bundle's model.json and weights file: changes whenever either does."""
    digest = hashlib.sha256()
    for name in (METADATA_FILE, WEIGHTS_FILE):
        path = Path(folder) / name
        if not path.is_file():
            raise BundleError(folder, f"has no {name}")
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def bundle_id(folder: str | os.PathLike) -> str:
    return bundle_hash(folder)[:16]


def _validation_summary(metadata: dict) -> dict:
    validation = metadata.get("validation") or {}
    per_organ = {v: round(float(r["dice"]), 4) for v, r in (validation.get("per_organ") or {}).items()
                 if isinstance(r, dict) and isinstance(r.get("dice"), (int, float))}
    mean = validation.get("mean_dice")
    return {"mean_dice": round(float(mean), 4) if isinstance(mean, (int, float)) else None,
            "per_organ": per_organ, "cases": validation.get("cases", 0)}


def bundle_record(folder: str | os.PathLike, metadata: dict | None = None) -> dict:
    """What a child bundle keeps of ``folder``: id, path, name, method, creation time, size of its
    training data, and its validation metrics."""
    folder = Path(folder).resolve()
    metadata = metadata if metadata is not None else read_metadata(folder)
    training = metadata.get("training") or {}
    return {"id": bundle_id(folder), "path": str(folder), "name": metadata.get("name"),
            "method": metadata.get("method"), "created": metadata.get("created"),
            "labeled": len(training.get("labeled") or {}), "validation": _validation_summary(metadata)}


def lineage_metadata(parent: str | os.PathLike, parent_metadata: dict) -> dict:
    """The "parent" and "lineage" entries of a bundle fine-tuned from ``parent``."""
    record = bundle_record(parent, parent_metadata)
    return {"parent": record, "lineage": list(parent_metadata.get("lineage") or []) + [record]}


def history(folder: str | os.PathLike) -> list[dict]:
    """Every version from the first ancestor to ``folder`` itself, oldest first, each with its
    validation metrics (the chain the bundles record; ancestors need not still exist)."""
    metadata = read_metadata(folder)
    return list(metadata.get("lineage") or []) + [bundle_record(folder, metadata)]


def format_history(folder: str | os.PathLike) -> str:
    rows = history(folder)
    lines = [f"{'version':>7}  {'id':<16}  {'method':<11} {'labeled':>7}  {'val. Dice':>9}  created / path"]
    for index, row in enumerate(rows, start=1):
        dice = row["validation"].get("mean_dice")
        shown = f"{dice:.4f}" if isinstance(dice, (int, float)) else "-"
        lines.append(f"{index:>7}  {row['id']:<16}  {row.get('method') or '?':<11} {row.get('labeled', 0):>7}  "
                     f"{shown:>9}  {row.get('created') or '?'}  {row['path']}")
    return "\n".join(lines)


def training_cases(store, ids_by_split: dict[str, list[str]]) -> list[dict]:
    """The labeled cases a model saw: id, split, current label version and that version's
    checksum and source (from the store's label history)."""
    out = []
    for split, ids in ids_by_split.items():
        for case_id in ids:
            case = store.case(case_id)
            record = next((h for h in case.history if int(h.get("version", 1)) == case.label_version), {})
            out.append({"case": case_id, "split": split, "label_version": case.label_version,
                        "sha256": record.get("sha256"), "source": record.get("source")})
    return out


def label_mismatch(bundle_labels: dict, not_trained: dict, store_labels: dict) -> str | None:
    """Why a bundle's label set (its classes plus the organs it left untrained) does not match a
    store's, or None. Compared by value and normalised name."""
    mine = {int(v): str(n) for v, n in {**(not_trained or {}), **bundle_labels}.items()}
    theirs = {int(v): str(n) for v, n in store_labels.items()}
    same = set(mine) == set(theirs) and all(normalise_name(mine[v]) == normalise_name(theirs[v]) for v in mine)
    if same:
        return None

    def show(labels):
        return "{" + ", ".join(f"{v}: {labels[v]}" for v in sorted(labels)) + "}"

    return f"the bundle's labels {show(mine)} differ from the store's {show(theirs)}"


def next_version_folder(parent: str | os.PathLike, folder: str | os.PathLike | None = None) -> Path:
    """A new run folder for a model fine-tuned from ``parent``: in ``folder`` (default: beside the
    parent's run folder), named ``<base>-ft<N>`` with the first N not taken (never an existing
    folder). The CLI and the panel both name versions this way."""
    parent = Path(parent).resolve()
    run = parent.parent if parent.name == "bundle" or re.fullmatch(r"bundle-\d+", parent.name) else parent
    where = Path(folder) if folder is not None else run.parent
    base = re.sub(r"-ft\d+$", "", re.sub(r"[^A-Za-z0-9._-]+", "_", run.name)).strip("._-") or "model"
    number = 1
    while (where / f"{base}-ft{number}").exists():
        number += 1
    return where / f"{base}-ft{number}"
