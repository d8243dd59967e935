"""Segment many scans in one process (the model loaded once): pairing inputs with outputs,
staged progress, and a clean stop on SIGTERM / Ctrl-C that leaves no half-written file.

Stages of each scan, with their share of its progress: read, preprocess, infer, restore,
cleanup (``--lcc`` only), write. Outputs are written atomically (temporary file, then rename),
and every output is checked before the first scan starts: nothing is ever overwritten.
"""

from __future__ import annotations

import contextlib
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


def plan_jobs(source: Path, target: Path) -> list[Job]:
    """Pair inputs with outputs: a file (or a DICOM series folder) with a file, or a folder of
    image files with a folder (same file names). Refuses, before anything runs, outputs that
    exist already, two inputs that would write the same output, and an empty input folder."""
    source, target = Path(source), Path(target)
    if not source.exists():
        raise InputFileError(source, "does not exist")
    images = sorted(p for p in source.iterdir() if p.is_file() and _is_image(p)) if source.is_dir() else []
    if images:
        if target.exists() and not target.is_dir():
            raise InputFileError(target, "is a file, but the input is a folder of scans: give an output folder")
        jobs = [Job(p, target / p.name, case_id_from_path(p)) for p in images]
    else:
        if source.is_dir() and not any(source.iterdir()):
            raise InputFileError(source, "is an empty folder: no image files and no DICOM series")
        if target.is_dir():
            raise InputFileError(target, "is a folder, but the input is one scan: give an output file name")
        file_suffix(target)  # a supported output type, checked now rather than after inference
        jobs = [Job(source, target, case_id_from_path(source))]
    existing = [str(job.output) for job in jobs if job.output.exists()]
    if existing:
        more = f" and {len(existing) - 1} more" if len(existing) > 1 else ""
        raise InputFileError(existing[0], f"already exists{more}; nothing was segmented (outputs are never "
                                          "overwritten: remove them or choose another output)")
    seen: dict[Path, Path] = {}
    for job in jobs:
        if job.output in seen:
            raise InputFileError(job.input, f"would write the same output as {seen[job.output]}")
        seen[job.output] = job.input
    return jobs


def _is_image(path: Path) -> bool:
    name = path.name.lower()
    return not name.startswith(".") and not name.endswith(SEGMENTATION_SUFFIX) and name.endswith(IMAGE_SUFFIXES)


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
