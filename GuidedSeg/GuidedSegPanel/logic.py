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

from . import commands, install, loop, models, nodes
from .export import ExportPlan, edited_segments, perform_export, plan_export
from .jobs import DeviceProbe, FineTuneJob, SegmentJob, SuggestJob, TrainJob, Update
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
        self.environment: dict[str, str | None] = {}  # torch / cuda / monai versions, from the probe
        self._store: CaseStore | None = None
        self._store_problem: str | None = None
        self._store_path = None
        self.comparison = ""  # the last fine-tune's validation Dice beside its parent's
        self.fine_tune_settings: tuple[str, ...] = ()  # train.py overrides for Fine-tune (tests shorten it)

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

    def import_model(self, source) -> models.ModelInfo:
        """Import a bundle (folder or .zip) into the models folder, checked first, and select it."""
        model = models.import_bundle(source, self.models_folder)
        self.refresh_models()
        self.parameters.model = str(model.path)
        return model

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

    def start_segment(self, confirm_replace=None) -> SegmentJob | None:
        """Start segmenting the chosen volume with the chosen model.

        The result goes into a new segmentation node, unless "replace" is chosen and the chosen
        segmentation belongs to this volume. Replacing a node whose segments differ from its model
        draft (the annotator's corrections) asks ``confirm_replace(question)`` first; without a
        callback, or when it says no, nothing starts and None is returned.
        """
        p = self.parameters
        model = self.selected_model()
        if p.input_volume is None:
            raise ValueError("Choose an input volume first.")
        if model is None:
            raise ValueError("Choose a model first.")
        if self.running("segment"):
            raise ValueError("A segmentation is already running.")
        target = self.replace_target()
        edits = self.corrections(target) if target is not None else []
        if edits:
            question = self.replace_question(target, edits)
            if confirm_replace is None or not confirm_replace(question):
                return None
        job = SegmentJob(p.input_volume, model, p.device, python=self.python, work_root=self.work_root,
                         ensemble=p.ensemble, largest_component=p.largest_component, runner=self.runner)
        job.replace, job.replace_edits = target, edits
        self.jobs["segment"] = job.start()
        return job

    def replace_target(self):
        """The segmentation node a Segment would replace: the chosen one, when "replace" is ticked and it
        was made on the chosen volume; None means a new node."""
        p = self.parameters
        node, volume = p.segmentation, p.input_volume
        if not p.replace_segmentation or node is None or node.GetScene() is None or volume is None:
            return None
        reference = node.GetNodeReference(node.GetReferenceImageGeometryReferenceRole())
        return node if reference is not None and reference.GetID() == volume.GetID() else None

    def corrections(self, node) -> list[str]:
        """What replacing ``node`` would throw away: the names of its segments that differ from the
        model's draft; every non-empty segment when it has no draft (it may all be hand-made)."""
        volume = self.parameters.input_volume
        edited = edited_segments(node, volume, self.segmentations_logic, self.scene)
        if edited is not None:
            return edited
        out = []
        for segment_id, name in nodes.segments(node):
            if nodes.segment_mask(node, segment_id, volume, self.segmentations_logic, self.scene).any():
                out.append(name)
        return out

    @staticmethod
    def replace_question(node, edits) -> str:
        shown = ", ".join(edits[:6]) + (f" and {len(edits) - 6} more" if len(edits) > 6 else "")
        return (f"{node.GetName()} holds corrections ({shown}) that replacing its segments would lose. "
                "Replace them with the model's new result? (Cancel keeps them; untick \"Segment into this "
                "segmentation\" to get a new segmentation instead.)")

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

    def start_starter_training(self) -> TrainJob:
        """Train a starter model on fresh synthetic phantoms (what the README's demo trains), in the
        background, into the models folder; the new bundle is listed and selected when done."""
        problem = models.folder_problem(self.models_folder)
        if problem:
            raise ValueError(problem)
        if self.running("train"):
            raise ValueError("Training is already running.")
        job = TrainJob(None, self.models_folder, "supervised", self.parameters.device, python=self.python,
                       store_name="starter-phantoms", runner=self.runner, settings=commands.STARTER_SETTINGS)
        self.jobs["train"] = job.start()
        return job

    # annotation loop -----------------------------------------------------------------------------
    def _ready_store(self) -> CaseStore:
        store = self.store()
        if store is None:
            raise ValueError(self._store_problem or "Choose a case store first.")
        return store

    def queue(self) -> list[str]:
        """The unlabeled cases in the order to correct them (see loop.queue); [] without a store."""
        store = self.store()
        return loop.queue(store) if store is not None else []

    def start_rank(self) -> SuggestJob:
        """Rank the store's unlabeled cases with the chosen model in the background (guidedseg suggest)."""
        store, model = self._ready_store(), self.selected_model()
        if model is None:
            raise ValueError("Choose a model first: it ranks the unlabeled cases.")
        if not store.cases("unlabeled"):
            raise ValueError(loop.empty_queue_text(store))
        if self.running("suggest"):
            raise ValueError("Ranking is already running.")
        job = SuggestJob(store.root, model, self.parameters.device, python=self.python, runner=self.runner)
        self.jobs["suggest"] = job.start()
        return job

    def next_case(self):
        """Load the first case of the queue as the input volume and start segmenting it with the
        chosen model (its draft, ready to correct); (case id, the Segment job or None without a
        usable model). ValueError saying the queue is empty when it is."""
        store = self._ready_store()
        order = loop.queue(store)
        if not order:
            raise ValueError(loop.empty_queue_text(store))
        case = store.case(order[0])
        p = self.parameters
        volume = loop.load_case(case, store, self.scene)
        p.input_volume, p.segmentation, p.current_case = volume, None, case.case_id
        model = self.selected_model()
        job = None
        if model is not None and model.usable and not self.running("segment"):
            job = self.start_segment()
        return case.case_id, job

    def skip_case(self):
        """Move the current case to the bottom of the queue (it stays in it) and load the next."""
        store, p = self._ready_store(), self.parameters
        if p.current_case and p.current_case in {c.case_id for c in store.cases("unlabeled")}:
            from GuidedSegLib.suggest import skip_case

            skip_case(store.root, p.current_case)
        return self.next_case()

    def reopen_case(self, case_id: str):
        """Load a labeled case with its latest label version, to correct it again."""
        store = self._ready_store()
        volume, node = loop.reopen(case_id, store, self.scene, self.segmentations_logic)
        p = self.parameters
        p.input_volume, p.segmentation, p.current_case = volume, node, case_id
        return node

    def start_fine_tune(self) -> FineTuneJob:
        """Fine-tune the chosen model on the store as it is now (train.py --init-from), in the background."""
        store, model = self._ready_store(), self.selected_model()
        if model is None or not model.usable:
            raise ValueError("Choose a usable model first: the fine-tune starts from it.")
        problem = models.folder_problem(self.models_folder)
        if problem:
            raise ValueError(problem)
        if self.running("train") or self.running("finetune"):
            raise ValueError("Training is already running.")
        job = FineTuneJob(store.root, self.models_folder, model, self.parameters.device, python=self.python,
                          runner=self.runner, settings=self.fine_tune_settings)
        self.jobs["finetune"] = job.start()
        self.parameters.labeled_at_fine_tune = len(store.cases("labeled"))
        return job

    def set_auto_fine_tune(self, every: int) -> None:
        """Fine-tune automatically after every ``every`` new labeled cases (0: off); counted from now."""
        p, store = self.parameters, self.store()
        if every and not p.auto_fine_tune_every and store is not None:
            p.labeled_at_fine_tune = len(store.cases("labeled"))
        p.auto_fine_tune_every = every

    def auto_fine_tune(self) -> FineTuneJob | None:
        """After an export: start a fine-tune when the option says one is due (off by default)."""
        store, p = self.store(), self.parameters
        if store is None or self.running("finetune") or self.running("train"):
            return None
        if not loop.fine_tune_due(len(store.cases("labeled")), p.labeled_at_fine_tune, p.auto_fine_tune_every):
            return None
        try:
            return self.start_fine_tune()
        except ValueError:
            return None

    def select_parent(self) -> models.ModelInfo | None:
        """Switch back to the chosen model's parent (an earlier version), when it is listed."""
        model = self.selected_model()
        parent = next((m for m in self.models if model and model.parent and m.path == Path(model.parent)), None)
        if parent is not None:
            self.parameters.model = str(parent.path)
        return parent

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
                    elif self._fall_back_to_cpu(job, update):
                        updates.append(Update(task, "The GPU ran out of memory: segmenting on the CPU instead",
                                              0.0, log=[f"{job.device}: {update.error}; running again on the CPU"]))
                        continue
                updates.append(update)
        return updates

    def _fall_back_to_cpu(self, job, update: Update) -> bool:
        """A Segment that ran out of GPU memory starts again on the CPU (same volume, model, target)."""
        if not isinstance(job, SegmentJob) or job.device == "cpu" or not commands.out_of_memory(update.error):
            return False
        try:  # the volume may have gone meanwhile: then the out-of-memory failure is what the user sees
            again = SegmentJob(job.volume_node, job.model, "cpu", python=self.python, work_root=self.work_root,
                               runner=self.runner, **job.options)
        except (GuidedSegError, ValueError, OSError):
            return False
        again.replace, again.replace_edits = job.replace, job.replace_edits
        self.jobs["segment"] = again.start()
        return True

    def device_name(self) -> str:
        device = self.parameters.device
        return dict(self.devices).get(device, device)

    def _on_success(self, job, update: Update) -> Update:
        if isinstance(job, SegmentJob):
            target = self._replaceable(job)
            try:
                node = job.load(self.scene, self.segmentations_logic, target)
            except (GuidedSegError, ValueError, OSError) as error:
                job.discard()
                return Update(job.task, "Failed", finished=True, error=str(error), elapsed_s=update.elapsed_s)
            self.parameters.segmentation = node
            update.result = node
            try:
                organs = loop.parse_organs(self.parameters.organs, job.model.labels)
            except ValueError as error:  # the choice names an organ this model lacks: all are kept
                update.log.append(f"organ choice ignored: {error}")
                organs = None
            if organs is not None:
                loop.keep_organs(node, [job.model.labels[v] for v in organs])
        elif isinstance(job, TrainJob):
            self.refresh_models()
            self.parameters.model = str(update.result)
            if isinstance(job, FineTuneJob):
                new = self.selected_model()
                parent = next((m for m in self.models if m.path == job.parent.path), job.parent)
                self.comparison = loop.comparison_text(new, parent) if new is not None else ""
        elif isinstance(job, SuggestJob):
            pass  # the ranking is in the store (suggestions.json); the queue reads it
        elif isinstance(job, DeviceProbe):
            self.devices = update.result
            self.environment = job.environment
            ids = [d for d, _ in self.devices]
            p = self.parameters
            if not p.device_chosen or p.device not in ids:  # the GPU by default, as found
                p.device = next((d for d in ids if d != "cpu"), "cpu")
        return update

    def _replaceable(self, job: SegmentJob):
        """The node chosen for replacement at start, if it is still there and holds no corrections
        beyond those the user agreed to lose (edits made while the model ran keep it: a new node is
        made instead)."""
        target = job.replace
        if target is None or target.GetScene() is None:
            return None
        return target if self.corrections(target) == list(job.replace_edits) else None

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
            models_folder_chosen=bool(self.models_folder),
            model_count=len(self.models),
            model_problem=model.problem if model is not None else None,
            has_model=model is not None,
            segmenting=self.running("segment"),
            has_segmentation=segmentation is not None and segmentation.GetSegmentation().GetNumberOfSegments() > 0,
            store_problem=self._store_problem,
            has_store=store is not None,
            training=self.running("train"),
            train_script_found=commands.train_script().is_file(),
            ranking=self.running("suggest"),
            current_case=p.current_case,
            fine_tuning=self.running("finetune"),
            queue_length=len(loop.queue(store)) if store is not None else 0,
            labeled_count=len(store.cases("labeled")) if store is not None else 0,
            has_parent=bool(model is not None and model.parent and any(m.path == Path(model.parent) for m in self.models)),
        )


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return os.environ.get("USER") or os.environ.get("USERNAME") or "unknown user"
