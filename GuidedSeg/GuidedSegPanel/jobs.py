"""One Segment, Train or device-probe run: its files, its child process and its result.

A job never blocks: ``start()`` launches the child, ``poll()`` returns :class:`Update` records
(status text, progress, log lines) and, once, a final one with ``finished=True`` saying whether
it worked and why not. A cancelled or failed Segment leaves nothing behind; a cancelled Train
keeps its run folder's checkpoint (``train.py --resume`` continues it) and writes no bundle.
"""

from __future__ import annotations

import datetime
import json
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import SimpleITK as sitk

from GuidedSegLib.imageio import read_label_map

from . import commands, nodes
from .export import DRAFT_LABELS_ATTRIBUTE
from .models import ModelInfo
from .process import ChildProcess, LogLine, Progress


@dataclass
class Update:
    task: str  # "segment", "train" or "devices"
    text: str | None = None  # status line
    progress: float | None = None  # 0..1
    log: list[str] = field(default_factory=list)
    finished: bool = False
    ok: bool = False
    error: str | None = None  # one readable line when a finished job failed
    result: object = None  # segment: the output file; train: the bundle folder; devices: [(id, name)]
    elapsed_s: float | None = None  # a finished job: seconds from start to end


class Job:
    """A child process plus what its updates mean."""

    task = "job"
    stages: ClassVar[dict[str, str]] = {}

    def __init__(self, argv: list[str], runner=ChildProcess):
        self.argv = argv
        self.process = runner(argv, env=commands.child_environment())
        self.reported_end = False
        self.started: float | None = None

    def start(self) -> Job:
        self.started = time.monotonic()
        self.process.start()
        return self

    @property
    def running(self) -> bool:
        return not self.reported_end

    def cancel(self) -> None:
        self.process.cancel()

    def poll(self) -> list[Update]:
        updates = []
        log = []
        for event in self.process.poll():
            if isinstance(event, Progress):
                if event.stage == "message":
                    log.append(str(event.record.get("text", "")))
                    continue
                updates.append(Update(self.task, commands.stage_text(event.stage, event.record, self.stages),
                                      event.progress))
            elif isinstance(event, LogLine) and event.text.strip():
                log.append(event.text)
        if log:
            updates.append(Update(self.task, log=log))
        if self.process.finished and not self.reported_end:
            self.reported_end = True
            final = self._finish()
            final.elapsed_s = time.monotonic() - self.started if self.started is not None else None
            updates.append(final)
        return updates

    def _finish(self) -> Update:
        if self.process.cancelled:
            self.discard()
            return Update(self.task, "Cancelled", finished=True, ok=False, error="cancelled")
        if self.process.returncode != 0:
            self.discard()
            return Update(self.task, "Failed", finished=True, ok=False, error=self.process.error_text())
        try:
            result = self.result()
        except (OSError, ValueError) as error:
            self.discard()
            return Update(self.task, "Failed", finished=True, ok=False, error=str(error))
        return Update(self.task, "Done", 1.0, finished=True, ok=True, result=result)

    def result(self):
        return self.process.result

    def discard(self) -> None:
        """Remove what a failed or cancelled run left."""


class SegmentJob(Job):
    """Write the volume to a work folder, run ``guidedseg segment`` on it; the result is the draft
    label file on the volume's grid, which :meth:`load` turns into a segmentation node."""

    task = "segment"
    stages = commands.SEGMENT_STAGES

    def __init__(self, volume_node, model: ModelInfo, device: str = "cpu", *, python: str, work_root=None,
                 ensemble: bool = False, largest_component: bool = False, runner=ChildProcess):
        if not model.usable:
            raise ValueError(model.problem)
        self.volume_node, self.model, self.device = volume_node, model, device
        self.options = {"ensemble": ensemble, "largest_component": largest_component}
        self.replace = None  # the segmentation node whose segments the result replaces (None: a new node)
        self.replace_edits: list[str] = []  # its corrections the user agreed to lose
        self.folder = Path(tempfile.mkdtemp(prefix="segment-", dir=work_root))
        self.input = self.folder / "input.nrrd"
        self.output = self.folder / "draft.nrrd"
        try:
            nodes.write_volume(volume_node, self.input)
        except Exception:
            shutil.rmtree(self.folder, ignore_errors=True)
            raise
        super().__init__(commands.segment_command(python, model.path, self.input, self.output, device,
                                                  ensemble and model.ensemble_possible, largest_component), runner)

    def result(self) -> Path:
        if not self.output.is_file():
            raise ValueError(f"{self.output}: the segmentation finished but wrote no label map")
        self.input.unlink(missing_ok=True)
        return self.output

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def load(self, scene, segmentations_logic, segmentation_node=None):
        """The result as a segmentation node (a new one, or ``segmentation_node`` with its segments
        replaced) with the bundle's names and colours. The draft is kept in the scene beside it,
        as a hidden label map node (``nodes.set_draft``), for the export's edit detection; the work
        folder in Slicer's temporary folder is then removed."""
        label = read_label_map(self.output, label_names={int(v): n for v, n in self.model.labels.items()},
                               reference=nodes.volume_grid(self.volume_node))
        name = f"{self.volume_node.GetName()} {self.model.name}"
        node = nodes.label_to_segmentation(
            label.image, self.model.labels, self.model.colours, self.volume_node, scene, segmentations_logic,
            node_name=scene.GenerateUniqueName(name) if segmentation_node is None else name,
            segmentation_node=segmentation_node)
        nodes.set_draft(node, sitk.GetArrayFromImage(label.image), self.volume_node, scene)
        node.SetAttribute(DRAFT_LABELS_ATTRIBUTE, json.dumps({str(v): n for v, n in self.model.labels.items()}))
        node.SetAttribute(nodes.MODEL_ATTRIBUTE, str(self.model.path))
        node.SetAttribute(nodes.MODEL_NAME_ATTRIBUTE, self.model.name)
        self.discard()
        return node


class TrainJob(Job):
    """Run Training/train.py on a store into a new run folder in the models folder; the result is
    the bundle it wrote, which the models folder then lists."""

    task = "train"
    stages = commands.TRAIN_STAGES

    def __init__(self, store_root, models_folder, method: str = "guidednet", device: str | None = None, *,
                 python: str, store_name: str = "", script=None, runner=ChildProcess, settings: tuple[str, ...] = ()):
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", store_name or Path(store_root).name).strip("._-") or "store"
        self.output = Path(models_folder) / f"{base}-{method}-{stamp}"
        number = 2
        while self.output.exists():
            self.output = Path(models_folder) / f"{base}-{method}-{stamp}-{number}"
            number += 1
        super().__init__(commands.train_command(python, store_root, self.output, method, device, script, settings),
                         runner)

    def result(self) -> Path:
        bundle = (self.process.result or {}).get("bundle")
        if not bundle or not (Path(bundle) / "model.json").is_file():
            raise ValueError(f"{self.output}: training finished but reported no model bundle")
        return Path(bundle)

    def discard(self) -> None:
        # A run stopped before its first checkpoint leaves an empty or near-empty folder: remove
        # it; a run with a checkpoint is kept so that train.py --resume can continue it.
        if self.output.is_dir() and not (self.output / "checkpoint.pt").exists():
            shutil.rmtree(self.output, ignore_errors=True)


class FineTuneJob(TrainJob):
    """Training/train.py --init-from the chosen model, on the store as it is now, into a new run
    folder in the models folder (a new bundle version; the parent is never touched)."""

    task = "finetune"

    def __init__(self, store_root, models_folder, parent: ModelInfo, device: str | None = None, *, python: str,
                 script=None, runner=ChildProcess, settings: tuple[str, ...] = ()):
        from GuidedSegLib.lineage import next_version_folder

        self.parent = parent
        self.output = next_version_folder(parent.path, models_folder)  # <run>-ft<N>, as train.py names it
        Job.__init__(self, commands.finetune_command(python, parent.path, store_root, self.output, device, script,
                                                     settings), runner)


class SuggestJob(Job):
    """guidedseg suggest on the store with the chosen model; the result is the ranking (case ids)."""

    task = "suggest"
    stages = commands.SUGGEST_STAGES

    def __init__(self, store_root, model: ModelInfo, device: str = "cpu", *, python: str, runner=ChildProcess):
        if not model.usable:
            raise ValueError(model.problem)
        super().__init__(commands.suggest_command(python, model.path, store_root, device), runner)

    def result(self) -> list[str]:
        return [entry["case"] for entry in (self.process.result or {}).get("ranking") or []]


class DeviceProbe(Job):
    """Ask a child Python which devices torch sees (Slicer itself never imports torch)."""

    task = "devices"

    def __init__(self, python: str, runner=ChildProcess):
        super().__init__(commands.device_probe_command(python), runner)
        self.environment: dict[str, str | None] = {}

    def result(self) -> list[tuple[str, str]]:
        self.environment = commands.environment_from_probe(self.process.result)
        return commands.devices_from_probe(self.process.result)
