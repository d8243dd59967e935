"""The GuidedSeg panel (Qt; inside Slicer only). Thin: it copies the logic's state onto the
controls, forwards clicks, and polls running jobs from a timer. Every decision (what is enabled,
what is said, what an export records) is made in the plain-Python modules beside it.
"""

from __future__ import annotations

import os
import shutil

import ctk  # noqa: F401  (registers the ctk widgets the .ui uses)
import qt
import slicer
import vtk
from slicer.util import VTKObservationMixin

from GuidedSegLib.errors import GuidedSegError

from . import commands, install, nodes, state
from .export import ExportPlan, ExportRefused
from .logic import PanelLogic
from .parameters import METHODS

MODELS_FOLDER_SETTING = "GuidedSeg/ModelsFolder"
POLL_MS = 150


class PanelWidget(VTKObservationMixin):
    def __init__(self, ui_path: str, logic: PanelLogic | None = None):
        VTKObservationMixin.__init__(self)
        self.widget = slicer.util.loadUI(ui_path)
        self.ui = slicer.util.childWidgetVariables(self.widget)
        self.widget.setMRMLScene(slicer.mrmlScene)
        self.logic = logic or PanelLogic(slicer.mrmlScene, slicer.modules.segmentations.logic(),
                                         work_root=slicer.app.temporaryPath)
        self._updating = False
        self.queue_note = ""  # what the last ranking found, shown under the queue's state
        self._cleanup_pending = False
        self._observed_parameters = None
        self.timer = qt.QTimer()
        self.timer.setInterval(POLL_MS)
        self.timer.connect("timeout()", self.on_timer)

        ui = self.ui
        ui.methodComboBox.addItems(list(METHODS))
        for box in (ui.modelComboBox, ui.deviceComboBox):  # long model and GPU names must not widen the panel
            box.setSizeAdjustPolicy(qt.QComboBox.AdjustToMinimumContentsLengthWithIcon)
            box.setMinimumContentsLength(12)
        ui.segmentProgressBar.setVisible(False)
        ui.trainProgressBar.setVisible(False)
        ui.fineTuneProgressBar.setVisible(False)
        ui.modelsFolderPathLineEdit.currentPath = qt.QSettings().value(MODELS_FOLDER_SETTING, "")
        self.logic.set_models_folder(ui.modelsFolderPathLineEdit.currentPath)

        ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.on_gui_changed)
        ui.segmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.on_gui_changed)
        ui.modelComboBox.connect("currentIndexChanged(int)", self.on_gui_changed)
        ui.deviceComboBox.connect("currentIndexChanged(int)", self.on_gui_changed)
        ui.deviceComboBox.connect("activated(int)", self.on_device_chosen)
        ui.methodComboBox.connect("currentIndexChanged(int)", self.on_gui_changed)
        ui.ensembleCheckBox.connect("toggled(bool)", self.on_gui_changed)
        ui.largestComponentCheckBox.connect("toggled(bool)", self.on_gui_changed)
        ui.replaceSegmentationCheckBox.connect("toggled(bool)", self.on_gui_changed)
        ui.storePathLineEdit.connect("currentPathChanged(QString)", self.on_gui_changed)
        ui.modelsFolderPathLineEdit.connect("currentPathChanged(QString)", self.on_models_folder_changed)
        ui.refreshModelsButton.connect("clicked()", self.on_refresh_models)
        ui.importModelButton.connect("clicked()", self.on_import_model)
        ui.starterModelButton.connect("clicked()", self.on_starter_model)
        ui.installButton.connect("clicked()", self.on_install)
        ui.segmentButton.connect("clicked()", self.on_segment)
        ui.correctButton.connect("clicked()", self.on_correct)
        ui.show3DButton.connect("toggled(bool)", self.on_show_3d)
        ui.exportButton.connect("clicked()", self.on_export)
        ui.trainButton.connect("clicked()", self.on_train)
        ui.rankButton.connect("clicked()", self.on_rank)
        ui.nextCaseButton.connect("clicked()", self.on_next_case)
        ui.skipButton.connect("clicked()", self.on_skip)
        ui.reopenButton.connect("clicked()", self.on_reopen)
        ui.fineTuneButton.connect("clicked()", self.on_fine_tune)
        ui.parentModelButton.connect("clicked()", self.on_parent_model)
        ui.organsLineEdit.connect("editingFinished()", self.on_gui_changed)
        ui.autoFineTuneSpinBox.connect("valueChanged(int)", self.on_gui_changed)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.on_scene_start_close)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.on_scene_end_close)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeRemovedEvent, self.on_node_removed)
        self.observe_parameters()
        self.fill_models()
        self.select_first_model_if_none()
        self.fill_devices()
        self.probe_devices()
        self.update_gui()

    # ------------------------------------------------------------------------------------------
    # lifecycle

    def cleanup(self) -> None:
        """Slicer closes the module (or the application): stop polling and end every child."""
        self.removeObservers()
        self.timer.stop()
        for task in list(self.logic.jobs):
            self.logic.cancel(task)

    def on_scene_start_close(self, caller=None, event=None) -> None:
        self.logic.cancel("segment")  # its volume is about to go; training does not depend on the scene

    def on_node_removed(self, caller=None, event=None) -> None:
        """A deleted segmentation takes its hidden draft with it (on the next turn of the event loop,
        not inside the scene's own removal)."""
        if not self._cleanup_pending:
            self._cleanup_pending = True
            qt.QTimer.singleShot(0, self.remove_orphan_drafts)

    def remove_orphan_drafts(self) -> None:
        self._cleanup_pending = False
        nodes.remove_orphan_drafts(slicer.mrmlScene)

    def on_scene_end_close(self, caller=None, event=None) -> None:
        self.observe_parameters()
        self.update_gui()

    def observe_parameters(self) -> None:
        node = self.logic.parameters.node
        if self._observed_parameters is not None:
            self.removeObserver(self._observed_parameters, vtk.vtkCommand.ModifiedEvent, self.update_gui)
        self._observed_parameters = node
        self.addObserver(node, vtk.vtkCommand.ModifiedEvent, self.update_gui)
        p = self.logic.parameters
        if p.input_volume is None:  # a sensible default: the volume shown in the views
            selection = slicer.app.applicationLogic().GetSelectionNode()
            volume_id = selection.GetActiveVolumeID() if selection else None
            volume = slicer.mrmlScene.GetNodeByID(volume_id) if volume_id else None
            if volume is not None and volume.IsA("vtkMRMLScalarVolumeNode") and not volume.IsA(
                    "vtkMRMLLabelMapVolumeNode"):
                p.input_volume = volume

    # ------------------------------------------------------------------------------------------
    # parameters <-> controls

    def fill_models(self) -> None:
        box = self.ui.modelComboBox
        was = self._updating
        self._updating = True
        try:
            box.clear()
            for model in self.logic.models:
                box.addItem(model.title(), str(model.path))
                if not model.usable:
                    index = box.count - 1
                    box.setItemData(index, model.problem, qt.Qt.ToolTipRole)
                    # a QComboBox's own model is a QStandardItemModel; should PythonQt hand it back as the
                    # base QAbstractItemModel, the item stays selectable and the tooltip still says why
                    item_of = getattr(box.model(), "item", None)
                    item = item_of(index) if item_of else None
                    if item is not None:
                        item.setEnabled(False)
        finally:
            self._updating = was

    def fill_devices(self) -> None:
        box = self.ui.deviceComboBox
        was = self._updating
        self._updating = True
        try:
            box.clear()
            for device, name in self.logic.devices:
                box.addItem(name, device)
        finally:
            self._updating = was

    def update_gui(self, caller=None, event=None) -> None:
        """Parameters -> controls, then the enabled states and messages from the logic's state."""
        if self._updating:
            return
        self._updating = True
        try:
            ui, p = self.ui, self.logic.parameters
            ui.inputVolumeSelector.setCurrentNode(p.input_volume)
            ui.segmentationSelector.setCurrentNode(p.segmentation)
            ui.modelComboBox.setCurrentIndex(ui.modelComboBox.findData(p.model))
            index = ui.deviceComboBox.findData(p.device)
            ui.deviceComboBox.setCurrentIndex(max(index, 0))
            ui.methodComboBox.setCurrentIndex(max(0, ui.methodComboBox.findText(p.method)))
            ui.ensembleCheckBox.checked = p.ensemble
            ui.largestComponentCheckBox.checked = p.largest_component
            ui.replaceSegmentationCheckBox.checked = p.replace_segmentation
            if ui.storePathLineEdit.currentPath != p.store:
                ui.storePathLineEdit.currentPath = p.store
            if ui.organsLineEdit.text != p.organs:
                ui.organsLineEdit.text = p.organs
            ui.autoFineTuneSpinBox.value = p.auto_fine_tune_every

            model = self.logic.selected_model()
            ui.modelInfoLabel.text = model.description() if model is not None else ""
            ui.modelInfoLabel.toolTip = str(model.path) if model is not None else ""
            ui.modelComboBox.toolTip = model.title() if model is not None else "The model bundle that segments"
            ui.ensembleCheckBox.enabled = model is not None and model.ensemble_possible
            store = self.logic.store()
            ui.storeInfoLabel.text = self.store_text(store)
            ui.environmentLabel.text = "" if self.logic.missing_packages() else commands.environment_text(
                self.logic.environment, self.logic.device_name())

            view = state.view(self.logic.state())
            ui.messageLabel.text = view.message
            ui.messageLabel.visible = bool(view.message)
            ui.installButton.visible = view.install_visible
            ui.starterModelButton.visible = view.starter_visible
            ui.segmentButton.text = view.segment_text
            ui.segmentButton.enabled = view.segment_enabled
            ui.segmentButton.toolTip = view.segment_tooltip
            for control in (ui.inputVolumeSelector, ui.modelComboBox, ui.deviceComboBox, ui.modelsFolderPathLineEdit,
                            ui.refreshModelsButton, ui.largestComponentCheckBox):
                control.enabled = view.inputs_enabled
            if not view.inputs_enabled:
                ui.ensembleCheckBox.enabled = False
            ui.correctButton.enabled = view.correct_enabled
            ui.replaceSegmentationCheckBox.enabled = view.inputs_enabled and p.segmentation is not None
            ui.show3DButton.enabled = view.correct_enabled
            ui.show3DButton.checked = bool(p.segmentation is not None and p.segmentation.GetSegmentation()
                                           .ContainsRepresentation("Closed surface"))
            ui.exportButton.enabled = view.export_enabled
            ui.exportButton.toolTip = view.export_tooltip
            ui.trainButton.text = view.train_text
            ui.trainButton.enabled = view.train_enabled
            ui.trainButton.toolTip = view.train_tooltip
            ui.methodComboBox.enabled = not self.logic.running("train")
            self.update_loop(view, store)
        finally:
            self._updating = False

    def update_loop(self, view, store) -> None:
        """The annotation loop's controls (called from update_gui)."""
        ui = self.ui
        ui.rankButton.text = view.rank_text
        ui.rankButton.enabled = view.rank_enabled
        ui.nextCaseButton.enabled = ui.skipButton.enabled = view.next_enabled
        if not self.logic.running("suggest"):
            ui.queueLabel.text = "\n".join(t for t in (view.queue_text, self.queue_note) if t)
        ui.reopenButton.enabled = ui.reopenComboBox.enabled = view.reopen_enabled
        labeled = [c.case_id for c in store.cases("labeled")] if store is not None else []
        if [ui.reopenComboBox.itemText(i) for i in range(ui.reopenComboBox.count)] != labeled:
            chosen = ui.reopenComboBox.currentText
            ui.reopenComboBox.clear()
            ui.reopenComboBox.addItems(labeled)
            ui.reopenComboBox.setCurrentIndex(max(0, ui.reopenComboBox.findText(chosen)))
        ui.fineTuneButton.text = view.fine_tune_text
        ui.fineTuneButton.enabled = view.fine_tune_enabled
        ui.fineTuneButton.toolTip = view.fine_tune_tooltip
        ui.parentModelButton.enabled = view.parent_enabled
        ui.comparisonLabel.text = self.logic.comparison

    @staticmethod
    def store_text(store) -> str:
        if store is None:
            return ""
        counts = store.annotation_counts("labeled")
        labeled = len(store.cases("labeled"))
        organs = ", ".join(f"{name} {counts[value]}/{labeled}" for value, name in store.organs.items())
        return (f"{store.name}: {labeled} labeled, {len(store.cases('unlabeled'))} unlabeled, "
                f"{len(store.cases('test'))} test cases. Annotated: {organs}")

    def on_gui_changed(self, *args) -> None:
        """Controls -> parameters (the parameter node's Modified event then refreshes the rest)."""
        if self._updating:
            return
        ui, p = self.ui, self.logic.parameters
        with slicer.util.NodeModify(p.node):
            p.input_volume = ui.inputVolumeSelector.currentNode()
            p.segmentation = ui.segmentationSelector.currentNode()
            if ui.modelComboBox.currentIndex >= 0:
                p.model = ui.modelComboBox.itemData(ui.modelComboBox.currentIndex) or ""
            if ui.deviceComboBox.currentIndex >= 0:
                p.device = ui.deviceComboBox.itemData(ui.deviceComboBox.currentIndex) or "cpu"
            if ui.methodComboBox.currentText in METHODS:
                p.method = ui.methodComboBox.currentText
            p.ensemble = ui.ensembleCheckBox.checked
            p.largest_component = ui.largestComponentCheckBox.checked
            p.replace_segmentation = ui.replaceSegmentationCheckBox.checked
            p.store = ui.storePathLineEdit.currentPath
            p.organs = ui.organsLineEdit.text
            self.logic.set_auto_fine_tune(ui.autoFineTuneSpinBox.value)
        self.update_gui()

    def on_models_folder_changed(self, path) -> None:
        if self._updating:
            return
        qt.QSettings().setValue(MODELS_FOLDER_SETTING, path)
        self.logic.set_models_folder(path)
        self.fill_models()
        self.select_first_model_if_none()
        self.update_gui()

    def on_refresh_models(self) -> None:
        self.logic.refresh_models()
        self.fill_models()
        self.select_first_model_if_none()
        self.update_gui()

    def ensure_models_folder(self) -> bool:
        """A models folder to import or train into: the chosen one, else a default beside Slicer's
        settings (created, and chosen, here)."""
        if self.logic.models_folder:
            return True
        folder = default_models_folder()
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as error:
            slicer.util.errorDisplay(f"{folder}: cannot create the models folder ({error}). Choose one.")
            return False
        self.ui.modelsFolderPathLineEdit.currentPath = folder  # -> on_models_folder_changed
        if self.logic.models_folder != folder:
            self.on_models_folder_changed(folder)
        return True

    def on_import_model(self) -> None:
        path = qt.QFileDialog.getOpenFileName(
            self.widget, "Import a model bundle: its .zip, or the model.json in its folder", "",
            "Model bundles (*.zip model.json);;All files (*)")
        path = path[0] if isinstance(path, (tuple, list)) else path  # PySide returns (path, filter)
        if not path or not self.ensure_models_folder():
            return
        source = os.path.dirname(path) if os.path.basename(path) == "model.json" else path
        try:
            with slicer.util.WaitCursor():
                model = self.logic.import_model(source)
        except (GuidedSegError, ValueError, OSError) as error:
            slicer.util.errorDisplay(f"Import failed; nothing was added to the models folder.\n\n{error}")
            return
        self.fill_models()
        self.update_gui()
        self.ui.segmentStatusLabel.text = f"Imported {model.name} into {state.elide_path(self.logic.models_folder)}."

    def on_starter_model(self) -> None:
        if not self.dependencies_ready() or not self.ensure_models_folder():
            return
        if not slicer.util.confirmOkCancelDisplay(
                "Train a starter model on synthetic abdominal phantoms? It runs in the background (minutes on a GPU, "
                f"longer on a CPU) and writes a new bundle into {self.logic.models_folder}.",
                windowTitle="Train a starter model"):
            return
        try:
            job = self.logic.start_starter_training()
        except (GuidedSegError, ValueError, OSError) as error:
            slicer.util.errorDisplay(f"Training could not start: {error}")
            return
        self.show_training(job)

    def show_training(self, job) -> None:
        self.append_log([f"training into {job.output}"])
        self.ui.trainCollapsibleButton.collapsed = False
        self.ui.trainProgressBar.setValue(0)
        self.ui.trainProgressBar.setVisible(True)
        self.ui.trainStatusLabel.text = "Starting..."
        self.timer.start()
        self.update_gui()

    def select_first_model_if_none(self) -> None:
        if self.logic.selected_model() is None:
            usable = [m for m in self.logic.models if m.usable]
            if usable:
                self.logic.parameters.model = str(usable[0].path)

    # ------------------------------------------------------------------------------------------
    # dependencies and devices

    def dependencies_ready(self) -> bool:
        """True when the packages are there; otherwise offer to install them: one question, then
        torch (PyTorch Utils, or the build the user picks) and the rest in one call."""
        missing = self.logic.missing_packages()
        if not missing:
            return True
        torch_installer = install.slicer_torch_installer()
        confirm, build = slicer.util.confirmOkCancelDisplay, None
        if torch_installer is None and any(r.module == "torch" for r in missing):
            build = self.ask_torch_build(missing)  # this question is the confirmation
            if build is None:
                self.ui.segmentStatusLabel.text = "Not installed: Segment and Train need these packages."
                return False
            confirm = lambda text: True  # noqa: E731
        try:  # the question is asked with the normal cursor; only the installing shows the wait cursor
            install.install(missing, confirm=confirm, pip_install=_with_wait_cursor(slicer.util.pip_install),
                            install_torch=_with_wait_cursor(torch_installer) if torch_installer else None,
                            pip_ensure=install.slicer_pip_ensure(), torch_build=build)
        except install.InstallDeclined as declined:
            self.ui.segmentStatusLabel.text = str(declined)
            return False
        except RuntimeError as error:
            slicer.util.errorDisplay(str(error), detailedText=str(error.__cause__ or ""))
            return False
        finally:
            self.update_gui()
        self.probe_devices()
        return not self.logic.missing_packages()

    def ask_torch_build(self, missing) -> str | None:
        """Which PyTorch build to install ("cuda" or "cpu"), or None when the user cancels."""
        box = qt.QMessageBox(slicer.util.mainWindow())
        box.setWindowTitle("Install PyTorch")
        box.setText(install.question(missing) + "\n\nWhich PyTorch build? (The PyTorch extension's PyTorch Utils "
                    "would choose for you; it is not installed.)")
        cuda = box.addButton("NVIDIA GPU (CUDA)", qt.QMessageBox.AcceptRole)
        cpu = box.addButton("CPU only", qt.QMessageBox.AcceptRole)
        box.addButton(qt.QMessageBox.Cancel)
        box.setDefaultButton(cuda if shutil.which("nvidia-smi") else cpu)
        box.exec_()
        clicked = box.clickedButton()
        return "cuda" if clicked == cuda else "cpu" if clicked == cpu else None

    def on_device_chosen(self, index) -> None:
        if not self._updating:
            self.logic.parameters.device_chosen = True

    def on_install(self) -> None:
        self.dependencies_ready()

    def probe_devices(self) -> None:
        if not self.logic.missing_packages() and self.logic.start_device_probe() is not None:
            self.timer.start()

    # ------------------------------------------------------------------------------------------
    # actions

    def on_segment(self) -> None:
        if self.logic.running("segment"):
            self.logic.cancel("segment")
            self.ui.segmentStatusLabel.text = "Cancelling..."
            return
        if not self.dependencies_ready():
            return
        try:
            job = self.logic.start_segment(confirm_replace=lambda question: slicer.util.confirmOkCancelDisplay(
                question, windowTitle="Replace corrected segmentation?"))
        except (GuidedSegError, ValueError, OSError) as error:
            slicer.util.errorDisplay(f"Segment could not start: {error}")
            return
        if job is None:
            self.ui.segmentStatusLabel.text = "Not started: the corrections are kept."
            return
        self.ui.segmentProgressBar.setValue(0)
        self.ui.segmentProgressBar.setVisible(True)
        self.ui.segmentStatusLabel.text = "Starting..."
        self.timer.start()
        self.update_gui()

    def on_correct(self) -> None:
        p = self.logic.parameters
        segmentation, volume = p.segmentation, p.input_volume
        if segmentation is None:
            return
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editor.setSegmentationNode(segmentation)
        if volume is not None:
            if hasattr(editor, "setSourceVolumeNode"):
                editor.setSourceVolumeNode(volume)
            else:  # Slicer before 5.4
                editor.setMasterVolumeNode(volume)

    def on_show_3d(self, shown) -> None:
        if self._updating:
            return
        node = self.logic.parameters.segmentation
        if node is None:
            return
        with slicer.util.WaitCursor():
            if shown:
                node.CreateClosedSurfaceRepresentation()
            else:
                node.RemoveClosedSurfaceRepresentation()

    def on_export(self) -> None:
        try:
            with slicer.util.WaitCursor():
                plan = self.logic.plan_export()
        except ExportRefused as refused:
            slicer.util.warningDisplay(str(refused), windowTitle="Export refused")
            return
        except (GuidedSegError, ValueError, OSError) as error:
            slicer.util.errorDisplay(f"Export failed: {error}")
            return
        checked = ExportDialog(plan).ask()
        if checked is None:
            return
        try:
            with slicer.util.WaitCursor():
                case = self.logic.export(plan, checked)
        except (GuidedSegError, ValueError, OSError) as error:
            slicer.util.errorDisplay(f"Export failed; the store was not changed.\n\n{error}")
            return
        store = self.logic.store()
        annotated = ", ".join(store.labels[v] for v in case.annotated) or "none"
        self.ui.segmentStatusLabel.text = (f"Stored label version {case.label_version} of case {case.case_id} "
                                           f"(annotated: {annotated}).")
        job = self.logic.auto_fine_tune()
        if job is not None:
            self.show_fine_tune(job, "Fine-tuning automatically (every "
                                     f"{self.logic.parameters.auto_fine_tune_every} new labeled cases)...")
        self.update_gui()

    # ------------------------------------------------------------------------------------------
    # annotation loop

    def on_rank(self) -> None:
        if self.logic.running("suggest"):
            self.logic.cancel("suggest")
            return
        try:
            self.logic.start_rank()
        except (GuidedSegError, ValueError, OSError) as error:
            slicer.util.warningDisplay(str(error), windowTitle="Rank")
            return
        self.ui.queueLabel.text = "Ranking the unlabeled cases..."
        self.timer.start()
        self.update_gui()

    def on_next_case(self, skip: bool = False) -> None:
        self.queue_note = ""
        try:
            with slicer.util.WaitCursor():
                case_id, job = self.logic.skip_case() if skip else self.logic.next_case()
        except (GuidedSegError, ValueError, OSError) as error:
            slicer.util.warningDisplay(str(error), windowTitle="Next case")
            self.update_gui()
            return
        if job is not None:
            self.ui.segmentProgressBar.setValue(0)
            self.ui.segmentProgressBar.setVisible(True)
            self.ui.segmentStatusLabel.text = "Starting..."
            self.timer.start()
        slicer.util.setSliceViewerLayers(background=self.logic.parameters.input_volume, fit=True)
        self.ui.segmentStatusLabel.text = (f"Case {case_id}: segmenting its draft..." if job else
                                           f"Case {case_id} loaded: choose a model to segment it.")
        self.update_gui()

    def on_skip(self) -> None:
        self.on_next_case(skip=True)

    def on_reopen(self) -> None:
        case_id = self.ui.reopenComboBox.currentText
        if not case_id:
            return
        try:
            with slicer.util.WaitCursor():
                node = self.logic.reopen_case(case_id)
        except (GuidedSegError, ValueError, OSError) as error:
            slicer.util.errorDisplay(f"Re-open failed: {error}")
            return
        slicer.util.setSliceViewerLayers(background=self.logic.parameters.input_volume, fit=True)
        self.ui.segmentStatusLabel.text = f"Re-opened {node.GetName()}: correct it, then export (a new label version)."
        self.update_gui()

    def on_fine_tune(self) -> None:
        if self.logic.running("finetune"):
            self.logic.cancel("finetune")
            self.ui.fineTuneStatusLabel.text = "Stopping..."
            return
        if not self.dependencies_ready():
            return
        try:
            job = self.logic.start_fine_tune()
        except (GuidedSegError, ValueError, OSError) as error:
            slicer.util.errorDisplay(f"Fine-tune could not start: {error}")
            return
        self.show_fine_tune(job, "Starting...")

    def show_fine_tune(self, job, text) -> None:
        self.append_log([f"fine-tuning {job.parent.name} into {job.output}"])
        self.ui.fineTuneProgressBar.setValue(0)
        self.ui.fineTuneProgressBar.setVisible(True)
        self.ui.fineTuneStatusLabel.text = text
        self.timer.start()
        self.update_gui()

    def on_parent_model(self) -> None:
        parent = self.logic.select_parent()
        if parent is not None:
            self.ui.fineTuneStatusLabel.text = f"Switched back to {parent.name}."
        self.update_gui()

    def on_train(self) -> None:
        if self.logic.running("train"):
            self.logic.cancel("train")
            self.ui.trainStatusLabel.text = "Stopping..."
            return
        if not self.dependencies_ready():
            return
        if not slicer.util.confirmOkCancelDisplay(
                f"Train a new {self.logic.parameters.method} model on {self.logic.parameters.store}? It runs in the "
                f"background (minutes on a GPU, much longer on a CPU) and writes a new bundle into "
                f"{self.logic.models_folder}."):
            return
        try:
            job = self.logic.start_train()
        except (GuidedSegError, ValueError, OSError) as error:
            slicer.util.errorDisplay(f"Training could not start: {error}")
            return
        self.show_training(job)

    # ------------------------------------------------------------------------------------------
    # progress

    def on_timer(self) -> None:
        changed = False
        for update in self.logic.poll():
            bar, label = {"segment": (self.ui.segmentProgressBar, self.ui.segmentStatusLabel),
                          "train": (self.ui.trainProgressBar, self.ui.trainStatusLabel),
                          "finetune": (self.ui.fineTuneProgressBar, self.ui.fineTuneStatusLabel),
                          "suggest": (None, self.ui.queueLabel)}.get(update.task, (None, None))
            if update.log:
                self.append_log(update.log)
            if bar is not None and update.progress is not None:
                bar.setValue(round(100 * update.progress))
            if label is not None and update.text and not update.finished:
                label.text = update.text
            if update.finished:
                changed = True
                self.finished(update, bar, label)
        if not self.logic.jobs:
            self.timer.stop()
        if changed:
            self.update_gui()

    def finished(self, update, bar, label) -> None:
        if bar is not None:
            bar.setVisible(False)
        if update.task == "devices":
            if update.ok:
                self.fill_devices()
            else:
                self.append_log([f"device probe failed: {update.error}"])
            return
        if update.ok and update.task == "segment":
            node = update.result
            label.text = (f"Done in {_duration(update.elapsed_s)}: {node.GetName()}. "
                          "Correct it, then export the corrected labels.")
            volume = self.logic.parameters.input_volume
            slicer.util.setSliceViewerLayers(background=volume, fit=False)
        elif update.task == "suggest":
            self.queue_note = (f"Ranked {len(update.result)} unlabeled case(s); next: {update.result[0]}. Click Next "
                               "case." if update.ok and update.result else f"Ranking failed: {update.error}")
        elif update.ok and update.task == "finetune":
            label.text = f"Done in {_duration(update.elapsed_s)}: new version {state.elide_path(update.result)}"
            self.fill_models()
        elif update.ok and update.task == "train":
            label.text = f"Done in {_duration(update.elapsed_s)}: new model {state.elide_path(update.result)}"
            self.fill_models()
        elif update.error == "cancelled" and update.task == "finetune":
            label.text = "Stopped; no new model was written."
        elif update.error == "cancelled":
            label.text = "Cancelled." if update.task == "segment" else \
                "Stopped. The run's checkpoint is kept (train.py --resume continues it); no model was written."
        else:
            what = {"segment": "Segmentation", "finetune": "Fine-tune"}.get(update.task, "Training")
            label.text = f"{what} failed: {update.error}"
            slicer.util.errorDisplay(f"{what} failed:\n\n{update.error}", detailedText="\n".join(
                self.log_tail()))

    def log_tail(self) -> list[str]:
        return self.ui.logTextEdit.toPlainText().splitlines()[-40:]

    def append_log(self, lines) -> None:
        for line in lines:
            self.ui.logTextEdit.appendPlainText(line)


def default_models_folder() -> str:
    """Where imported and starter models go when no models folder was chosen: beside Slicer's
    user settings (e.g. ~/.config/slicer.org/GuidedSeg/models)."""
    return os.path.join(os.path.dirname(slicer.app.slicerUserSettingsFilePath), "GuidedSeg", "models")


def _duration(seconds) -> str:
    if seconds is None:
        return "?"
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def _with_wait_cursor(function):
    """``function`` run under Slicer's wait cursor (Slicer 5.10 and 5.12 message boxes keep a wait
    cursor set around them, so the cursor is set here around the installing only)."""

    def run(*args, **kwargs):
        with slicer.util.WaitCursor():
            return function(*args, **kwargs)

    return run


class ExportDialog:
    """Asks which organs the annotator checked; says which will count as annotated."""

    def __init__(self, plan: ExportPlan):
        self.plan = plan
        self.dialog = qt.QDialog(slicer.util.mainWindow())
        self.dialog.setWindowTitle("Export corrected labels")
        layout = qt.QVBoxLayout(self.dialog)
        if plan.draft_found:
            text = ("Edited segments always count as annotated. Tick the other organs you checked "
                    "(an empty one then counts as absent); unticked organs stay unannotated, unknown to training.")
        else:
            text = ("The model's draft of this segmentation is not in the scene, so the panel cannot tell what you "
                    "edited: tick every organ you reviewed (an empty one then counts as absent). Unticked organs "
                    "stay unannotated, unknown to training.")
        intro = qt.QLabel(text)
        intro.wordWrap = True
        layout.addWidget(intro)
        self.boxes = {}
        for organ in plan.organs:
            if organ.edited:
                note = "edited" if organ.voxels else "edited: erased (absent)"
            elif organ.segment_name is None:
                note = "no segment"
            else:
                note = f"{organ.voxels} voxels" if organ.voxels else "empty"
            box = qt.QCheckBox(f"{organ.name} ({note})")
            box.checked = organ.edited
            box.enabled = not organ.edited
            box.connect("toggled(bool)", self.update_summary)
            layout.addWidget(box)
            self.boxes[organ.value] = box
        self.summary = qt.QLabel()
        self.summary.wordWrap = True
        layout.addWidget(self.summary)
        buttons = qt.QDialogButtonBox()
        self.export_button = qt.QPushButton("Export")
        buttons.addButton(self.export_button, qt.QDialogButtonBox.AcceptRole)
        buttons.addButton(qt.QDialogButtonBox.Cancel)
        buttons.connect("accepted()", self.dialog.accept)
        buttons.connect("rejected()", self.dialog.reject)
        layout.addWidget(buttons)
        self.update_summary()

    def checked(self) -> list[int]:
        return [v for v, box in self.boxes.items() if box.checked and box.enabled]

    def update_summary(self, *args) -> None:
        self.summary.text = self.plan.summary(self.checked())

    def ask(self) -> list[int] | None:
        """The organs ticked as checked, or None when the user cancelled."""
        return self.checked() if self.dialog.exec_() == qt.QDialog.Accepted else None

