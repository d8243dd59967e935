"""The panel's logic: settings, model list, Segment / Train / device-probe jobs, export, and the
:class:`~GuidedSegPanel.state.PanelState` the widget shows. Plain Python with MRML; no Qt.

The widget calls :meth:`PanelLogic.poll` from a timer and shows the updates; everything slow
runs in child processes, so Slicer stays responsive.
"""

from __future__ import annotations

import getpass
import os
from pathlib import Path

from GuidedSegLib.errors import GuidedSegError
from GuidedSegLib.store import CaseStore

from . import commands, install, models
from .export import ExportPlan, perform_export, plan_export
from .jobs import DeviceProbe, SegmentJob, TrainJob, Update
from .parameters import PanelParameters, parameter_node
from .process import ChildProcess
from .state import PanelState


class PanelLogic:
    def __init__(self, scene, segmentations_logic, *, python: str | None = None, work_root=None,
                 runner=ChildProcess, find_spec=None):
        self.scene = scene
        self.segmentations_logic = segmentations_logic
        self.python = python or commands.python_executable()
        self.work_root = work_root
        self.runner = runner
        self.find_spec = find_spec
        self.models_folder = ""
        self.models: list[models.ModelInfo] = []
        self.jobs: dict[str, object] = {}  # task -> running job
        self.devices: list[tuple[str, str]] = [("cpu", "CPU")]
        self._store: CaseStore | None = None
        self._store_problem: str | None = None
        self._store_path = None

    @property
    def parameters(self) -> PanelParameters:
        return PanelParameters(parameter_node(self.scene))

    # models ------------------------------------------------------------------------------------
    def set_models_folder(self, folder) -> None:
        self.models_folder = str(folder or "")
        self.refresh_models()

    def refresh_models(self) -> list[models.ModelInfo]:
        self.models = models.list_models(self.models_folder) if not models.folder_problem(self.models_folder) else []
        return self.models

    def selected_model(self) -> models.ModelInfo | None:
        chosen = self.parameters.model
        for model in self.models:
            if chosen and Path(chosen) == model.path:
                return model
        return None

    # store -------------------------------------------------------------------------------------
    def store(self) -> CaseStore | None:
        """The chosen case store (opened once per path; re-read from disk each time it is asked for)."""
        path = self.parameters.store
        if path != self._store_path or self._store is None:
            self._store_path, self._store, self._store_problem = path, None, None
            if path:
                try:
                    self._store = CaseStore(path)
                except GuidedSegError as error:
                    self._store_problem = str(error)
        else:
            try:
                self._store.reload()
            except GuidedSegError as error:
                self._store, self._store_problem = None, str(error)
        return self._store

    # jobs --------------------------------------------------------------------------------------
    def running(self, task: str) -> bool:
        return task in self.jobs

    def start_segment(self) -> SegmentJob:
        p = self.parameters
        model = self.selected_model()
        if p.input_volume is None:
            raise ValueError("Choose an input volume first.")
        if model is None:
            raise ValueError("Choose a model first.")
        if self.running("segment"):
            raise ValueError("A segmentation is already running.")
        job = SegmentJob(p.input_volume, model, p.device, python=self.python, work_root=self.work_root,
                         ensemble=p.ensemble, largest_component=p.largest_component, runner=self.runner)
        self.jobs["segment"] = job.start()
        return job

    def start_train(self) -> TrainJob:
        store = self.store()
        if store is None:
            raise ValueError(self._store_problem or "Choose a case store first.")
        problem = models.folder_problem(self.models_folder)
        if problem:
            raise ValueError(problem)
        if self.running("train"):
            raise ValueError("Training is already running.")
        p = self.parameters
        job = TrainJob(store.root, self.models_folder, p.method, p.device, python=self.python, store_name=store.name,
                       runner=self.runner)
        self.jobs["train"] = job.start()
        return job

    def start_device_probe(self) -> DeviceProbe | None:
        if self.running("devices"):
            return None
        job = DeviceProbe(self.python, runner=self.runner)
        self.jobs["devices"] = job.start()
        return job

    def cancel(self, task: str) -> None:
        job = self.jobs.get(task)
        if job is not None:
            job.cancel()

    def poll(self) -> list[Update]:
        """Updates of every running job; a finished Segment becomes the parameter node's
        segmentation, a finished Train refreshes the model list and selects its bundle."""
        updates = []
        for task, job in list(self.jobs.items()):
            for update in job.poll():
                if update.finished:
                    del self.jobs[task]
                    if update.ok:
                        update = self._on_success(job, update)
                updates.append(update)
        return updates

    def _on_success(self, job, update: Update) -> Update:
        if isinstance(job, SegmentJob):
            try:
                node = job.load(self.scene, self.segmentations_logic, self._reusable_segmentation(job))
            except (GuidedSegError, ValueError, OSError) as error:
                job.discard()
                return Update(job.task, "Failed", finished=True, error=str(error))
            self.parameters.segmentation = node
            update.result = node
        elif isinstance(job, TrainJob):
            self.refresh_models()
            self.parameters.model = str(update.result)
        elif isinstance(job, DeviceProbe):
            self.devices = update.result
            if self.parameters.device not in [d for d, _ in self.devices]:
                self.parameters.device = "cpu"
        return update

    def _reusable_segmentation(self, job: SegmentJob):
        """Segmenting the same volume again replaces the segments of the panel's segmentation
        node when it was made from that volume; otherwise a new node is made."""
        node = self.parameters.segmentation
        if node is None or node.GetScene() is None:
            return None
        reference = node.GetNodeReference(node.GetReferenceImageGeometryReferenceRole())
        return node if reference is not None and reference.GetID() == job.volume_node.GetID() else None

    # export ------------------------------------------------------------------------------------
    def plan_export(self) -> ExportPlan:
        store = self.store()
        if store is None:
            raise ValueError(self._store_problem or "Choose a case store first.")
        p = self.parameters
        return plan_export(p.segmentation, p.input_volume, store, self.segmentations_logic, self.scene)

    def export(self, plan: ExportPlan, checked=()):
        store = self.store()
        source = f"GuidedSeg Slicer panel ({_user()})"
        return perform_export(plan, store, checked, source=source)

    # state -------------------------------------------------------------------------------------
    def missing_packages(self) -> list[install.Requirement]:
        return install.missing(self.find_spec) if self.find_spec else install.missing()

    def state(self) -> PanelState:
        p = self.parameters
        model = self.selected_model()
        store = self.store()
        folder_problem = models.folder_problem(self.models_folder)
        segmentation = p.segmentation
        return PanelState(
            missing_packages=[r.package for r in self.missing_packages()],
            has_volume=p.input_volume is not None,
            models_folder_problem=folder_problem,
            model_count=len(self.models),
            model_problem=model.problem if model is not None else None,
            has_model=model is not None,
            segmenting=self.running("segment"),
            has_segmentation=segmentation is not None and segmentation.GetSegmentation().GetNumberOfSegments() > 0,
            store_problem=self._store_problem,
            has_store=store is not None,
            training=self.running("train"),
            train_script_found=commands.train_script().is_file(),
        )


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return os.environ.get("USER") or os.environ.get("USERNAME") or "unknown user"
