"""The panel's settings, kept in the scene's parameter node so they are saved with the scene.

A ``vtkMRMLScriptedModuleNode`` singleton (tag "GuidedSeg") holds strings and node references;
this class gives them names and types. The models folder is not here: it belongs to the user,
not the scene, and lives in Slicer's application settings (see the widget).
"""

from __future__ import annotations

MODULE_NAME = "GuidedSeg"
METHODS = ("guidednet", "cps", "supervised", "dkuxnet")


def parameter_node(scene):
    """The scene's GuidedSeg parameter node, created when missing."""
    node = scene.GetSingletonNode(MODULE_NAME, "vtkMRMLScriptedModuleNode")
    if node is None:
        node = scene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
        node.UnRegister(None)  # CreateNodeByClass hands over a reference; the scene keeps its own
        node.SetSingletonTag(MODULE_NAME)
        node.SetModuleName(MODULE_NAME)
        node.SetName(f"{MODULE_NAME} parameters")
        node = scene.AddNode(node)
    if node.GetAttribute("ModuleName") != MODULE_NAME:  # what slicer.util.getModuleLogic(...).getAllParameterNodes() finds
        node.SetAttribute("ModuleName", MODULE_NAME)
    return node


class PanelParameters:
    """Typed access to the parameter node's values."""

    def __init__(self, node):
        self.node = node

    # strings ---------------------------------------------------------------------------------
    def _get(self, key: str, default: str = "") -> str:
        value = self.node.GetParameter(key)
        return value if value else default

    def _set(self, key: str, value) -> None:
        if self._get(key) != str(value):
            self.node.SetParameter(key, str(value))

    @property
    def model(self) -> str:
        """Folder of the chosen bundle."""
        return self._get("Model")

    @model.setter
    def model(self, path) -> None:
        self._set("Model", path or "")

    @property
    def device(self) -> str:
        return self._get("Device", "cpu")

    @device.setter
    def device(self, value: str) -> None:
        self._set("Device", value or "cpu")

    @property
    def device_chosen(self) -> bool:
        """The user picked the device; until then the panel takes the first GPU the probe finds."""
        return self._get("DeviceChosen", "false") == "true"

    @device_chosen.setter
    def device_chosen(self, value: bool) -> None:
        self._set("DeviceChosen", "true" if value else "false")

    @property
    def ensemble(self) -> bool:
        return self._get("Ensemble", "false") == "true"

    @ensemble.setter
    def ensemble(self, value: bool) -> None:
        self._set("Ensemble", "true" if value else "false")

    @property
    def largest_component(self) -> bool:
        return self._get("LargestComponent", "false") == "true"

    @largest_component.setter
    def largest_component(self, value: bool) -> None:
        self._set("LargestComponent", "true" if value else "false")

    @property
    def replace_segmentation(self) -> bool:
        """Segment into the chosen segmentation node (replacing its segments) instead of a new node."""
        return self._get("ReplaceSegmentation", "false") == "true"

    @replace_segmentation.setter
    def replace_segmentation(self, value: bool) -> None:
        self._set("ReplaceSegmentation", "true" if value else "false")

    @property
    def store(self) -> str:
        """Folder of the case store that exports go into and Train learns from."""
        return self._get("Store")

    @store.setter
    def store(self, path) -> None:
        self._set("Store", path or "")

    @property
    def method(self) -> str:
        value = self._get("TrainMethod", METHODS[0])
        return value if value in METHODS else METHODS[0]

    @method.setter
    def method(self, value: str) -> None:
        if value not in METHODS:
            raise ValueError(f"training method {value!r} is not one of {METHODS}")
        self._set("TrainMethod", value)

    @property
    def current_case(self) -> str:
        """The store case loaded by Next case or Re-open ("" when none)."""
        return self._get("CurrentCase")

    @current_case.setter
    def current_case(self, case_id) -> None:
        self._set("CurrentCase", case_id or "")

    @property
    def organs(self) -> str:
        """The organs to segment, comma-separated names ("" for all)."""
        return self._get("Organs")

    @organs.setter
    def organs(self, text) -> None:
        self._set("Organs", text or "")

    @property
    def auto_fine_tune_every(self) -> int:
        """Fine-tune automatically after this many new labeled cases (0: off, the default)."""
        value = self._get("AutoFineTuneEvery", "0")
        return int(value) if value.isdigit() else 0

    @auto_fine_tune_every.setter
    def auto_fine_tune_every(self, every: int) -> None:
        self._set("AutoFineTuneEvery", max(0, int(every)))

    @property
    def labeled_at_fine_tune(self) -> int:
        """How many labeled cases the store had at the last fine-tune (or when the count started)."""
        value = self._get("LabeledAtFineTune", "0")
        return int(value) if value.isdigit() else 0

    @labeled_at_fine_tune.setter
    def labeled_at_fine_tune(self, count: int) -> None:
        self._set("LabeledAtFineTune", int(count))

    # node references --------------------------------------------------------------------------
    @property
    def input_volume(self):
        return self.node.GetNodeReference("InputVolume")

    @input_volume.setter
    def input_volume(self, node) -> None:
        self.node.SetNodeReferenceID("InputVolume", node.GetID() if node is not None else None)

    @property
    def segmentation(self):
        return self.node.GetNodeReference("Segmentation")

    @segmentation.setter
    def segmentation(self, node) -> None:
        self.node.SetNodeReferenceID("Segmentation", node.GetID() if node is not None else None)
