"""Segment many scans in one process (the model loaded once): pairing inputs with outputs,
staged progress, and a clean stop on SIGTERM / Ctrl-C that leaves no half-written file.

Stages of each scan, with their share of its progress: read, preprocess, infer, restore,
cleanup (``--lcc`` only), write. Outputs are written atomically (temporary file, then rename),
and every output is checked before the first scan starts: nothing is overwritten unless asked
(``--overwrite``), and then only by a complete file.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import InputFileError
from .imageio import IMAGE_SUFFIXES, SEGMENTATION_SUFFIX, case_id_from_path, file_suffix
from .progress import Reporter

#: (start, width) of each stage within one scan's share of the overall progress.
#: A scan with at most this many distinct whole values (none negative) is taken for a label map.
LABEL_MAP_VALUES = 64

STAGE_SPAN = {"read": (0.0, 0.05), "preprocess": (0.05, 0.1), "infer": (0.15, 0.65), "restore": (0.8, 0.12),
              "cleanup": (0.92, 0.04), "write": (0.96, 0.04)}


class Interrupted(BaseException):
    """SIGTERM or SIGINT arrived; a BaseException, so no ``except Exception`` swallows it."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT raise :class:`Interrupted` at once (in the main
    thread, between Python bytecodes: within a second even while a network runs, since each
    layer returns to Python). Atomic writers then remove their temporary files as the
    exception passes through them."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum, frame):
        raise Interrupted(signum)

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@dataclass(frozen=True)
class Job:
    input: Path
    output: Path
    case_id: str


def plan_jobs(source: Path, target: str | Path, overwrite: bool = False) -> list[Job]:
    """Pair inputs with outputs, before anything runs.

    - a folder of image files -> an output folder (created; same file names);
    - one scan (an image file or a DICOM series folder) -> an output file, or into an output
      folder (one that exists, or a name ending in '/' or without a file suffix) under the
      scan's own name (a DICOM series: ``<folder name>.nii.gz``).

    Refuses, naming the path at fault: a missing input, a folder with neither image files nor a
    DICOM series, a folder of scans with an output that names a file, an unsupported output
    type, two inputs that would write the same output, and outputs that exist already (unless
    ``overwrite``: each is then replaced by a rename once its new version is complete)."""
    source, raw = Path(source), str(target)
    target = Path(target)
    if not source.exists():
        raise InputFileError(source, "does not exist")
    images = sorted(p for p in source.iterdir() if p.is_file() and _is_image(p)) if source.is_dir() else []
    if images:
        if target.exists() and not target.is_dir():
            raise InputFileError(target, "is a file, but the input is a folder of scans: give an output folder")
        if not target.exists() and _names_a_file(target):
            raise InputFileError(target, f"names a file ({file_suffix(target)}), but the input {source} is a folder "
                                         "of scans: give an output folder")
        jobs = [Job(p, target / p.name, case_id_from_path(p)) for p in images]
    else:
        if source.is_dir() and not _has_dicom_series(source):
            raise InputFileError(source, "holds no image files (.nii.gz, .nii, .nrrd, .mha, .mhd) and no DICOM "
                                         "series")
        if not source.is_dir():
            file_suffix(source)  # a supported input type
        case = case_id_from_path(source)
        if target.is_dir() or raw.endswith(("/", os.sep)) or not _names_a_file(target):
            name = f"{case}.nii.gz" if source.is_dir() else source.name
            if name.lower().endswith(SEGMENTATION_SUFFIX):
                name = f"{case}.nii.gz"
            target = target / name
        file_suffix(target)  # a supported output type, checked now rather than after inference
        jobs = [Job(source, target, case)]
    folders = [str(job.output) for job in jobs if job.output.is_dir()]
    if folders:
        raise InputFileError(folders[0], "is a folder; it cannot be replaced by a label map")
    existing = [str(job.output) for job in jobs if job.output.exists()]
    if existing and not overwrite:
        more = f" and {len(existing) - 1} more" if len(existing) > 1 else ""
        raise InputFileError(existing[0], f"already exists{more}; nothing was segmented (pass --overwrite to "
                                          "replace it, or choose another output)")
    seen: dict[Path, Path] = {}
    for job in jobs:
        if job.output in seen:
            raise InputFileError(job.input, f"would write the same output as {seen[job.output]}")
        seen[job.output] = job.input
    return jobs


def _names_a_file(path: Path) -> bool:
    """True when the name ends in a suffix (``seg.nii.gz``, ``out.txt``): meant as a file."""
    return bool(Path(path).suffix)


def _has_dicom_series(folder: Path) -> bool:
    import SimpleITK as sitk

    warnings = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # ITK prints a raw warning for a folder without DICOM
    try:
        return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warnings)


def _is_image(path: Path) -> bool:
    name = path.name.lower()
    return not name.startswith(".") and not name.endswith(SEGMENTATION_SUFFIX) and name.endswith(IMAGE_SUFFIXES)


def input_warning(image, path: Path) -> str | None:
    """A warning for a scan that looks like a label map (a few whole values, none negative) or
    that holds one value everywhere; None for an ordinary scan. Segmenting such an input gives
    nothing useful, and it is usually the wrong file."""
    import numpy as np
    import SimpleITK as sitk

    array = sitk.GetArrayViewFromImage(image)
    low, high = float(array.min()), float(array.max())
    if low == high:
        return f"warning: {path}: holds the one value {low:g} in every voxel, so there is nothing to segment"
    if low < 0 or high > 1000 or not high.is_integer():
        return None
    present = np.zeros(int(high) + 1, dtype=bool)
    for plane in array:  # slice by slice: no full-size copy of a large scan
        if plane.dtype.kind == "f" and not np.array_equal(plane, np.round(plane)):
            return None
        present[plane.astype(np.intp)] = True
        if np.count_nonzero(present) > LABEL_MAP_VALUES:
            return None
    return (f"warning: {path}: looks like a label map, not a scan ({np.count_nonzero(present)} whole values from "
            f"{low:g} to {high:g}); segmenting it anyway")


def run_jobs(predictor, jobs: list[Job], reporter: Reporter, lcc: bool = False) -> list[Path]:
    """Segment each job's input and write its output; returns the outputs written."""
    from .imageio import read_image, write_label_map

    names = {int(v): n for v, n in predictor.metadata["labels"].items() if int(v) != 0}
    colours = {int(v): tuple(c) for v, c in predictor.metadata.get("colours", {}).items()}
    total = len(jobs)
    reporter.start_bar(0, 100 * total, "segmenting", "%")
    written: list[Path] = []
    began = time.monotonic()
    for index, job in enumerate(jobs):
        def report(stage: str, fraction: float, index=index, job=job) -> None:
            start, width = STAGE_SPAN[stage]
            overall = (index + start + width * fraction) / total
            reporter.emit({"stage": stage, "progress": round(overall, 4), "stage_progress": round(fraction, 4),
                           "case": job.case_id, "index": index, "total": total})
            reporter.set_bar(int(100 * total * overall), case=job.case_id, stage=stage)

        report("read", 0.0)
        image = read_image(job.input)
        warning = input_warning(image, job.input)
        if warning:
            reporter.message(warning)
        label = predictor.segment(image, lcc=lcc, progress=report)
        report("write", 0.0)
        write_label_map(label, job.output, names, colours)
        written.append(job.output)
        report("write", 1.0)
        reporter.message(f"wrote {job.output}")
    reporter.close()
    reporter.emit({"stage": "done", "progress": 1.0, "outputs": [str(p) for p in written],
                   "seconds": round(time.monotonic() - began, 2)})
    return written
