"""A thin PythonQt-like adapter over PySide6, so the module's real ``.ui`` and widget code run in a
real Qt event loop outside Slicer (test code; the module itself is never changed for it).

What Slicer gives a scripted module, and what stands in for it here:

- ``qt``: PySide6's classes, each QObject class wrapped so that it behaves as PythonQt does:
  Qt properties read and write as attributes (``label.text = "x"``, ``box.currentIndex``),
  ``obj.connect("signal(args)", slot)`` connects by signature, ``obj.name`` is the object name.
  ``qt.QUiLoader`` builds every widget of a ``.ui`` file as such a wrapped class.
- ``ctk``: ``ctkCollapsibleButton`` and ``ctkPathLineEdit`` stand-ins (the two the panel uses).
- the MRML widgets: ``qMRMLWidget`` and ``qMRMLNodeComboBox`` stand-ins over a real
  slicer-core scene (node lists follow the scene's node-added and node-removed events).
- ``slicer``: slicer-core's own module with ``mrmlScene``, ``app`` (temporary path, application
  logic with the scene's selection node, processEvents) and ``modules.segmentations.logic()``
  set; slicer-core's ``slicer.util`` functions (loadUI, childWidgetVariables, WaitCursor,
  VTKObservationMixin, ...) are used as they are, since they import ``qt`` when called.

``install(...)`` puts the ``qt`` and ``ctk`` modules into ``sys.modules`` and returns an
:class:`Adapter`; the message boxes of ``slicer.util`` are replaced by recorders whose answers
the test chooses (``adapter.answers``), and ``adapter.restore()`` undoes it all.
"""

from __future__ import annotations

import os
import re
import sys
import types
import xml.etree.ElementTree as ET
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6 import QtCore, QtGui, QtTest, QtUiTools, QtWidgets  # noqa: E402
from PySide6.QtCore import Property, Signal  # noqa: E402

_QOBJECT_PROPERTY = QtCore.QObject.property
_QOBJECT_SET_PROPERTY = QtCore.QObject.setProperty
_QOBJECT_META = QtCore.QObject.metaObject
_READING: set = set()  # (object id, property name) being read now


class PythonQtStyle:
    """Mixin giving a PySide6 object PythonQt's ways: properties as attributes, connect by signature."""

    def __getattribute__(self, name):
        if name[:1] != "_":
            key = (id(self), name)
            if key not in _READING and _QOBJECT_META(self).indexOfProperty(name) >= 0:
                # reading a property like sizeHint calls the C++ virtual, which asks Python for an
                # override by this same name: that inner lookup must find the method, not recurse
                _READING.add(key)
                try:
                    return _QOBJECT_PROPERTY(self, name)
                finally:
                    _READING.discard(key)
            if name == "name":
                return QtCore.QObject.objectName(self)
            if name in _OWN:  # shiboken's lookup would find QObject.connect first
                return types.MethodType(_OWN[name], self)
        return super().__getattribute__(name)

    def __setattr__(self, name, value):
        if name[:1] != "_" and _QOBJECT_META(self).indexOfProperty(name) >= 0:
            if not _QOBJECT_SET_PROPERTY(self, name, value):
                raise AttributeError(f"{type(self).__name__}.{name} cannot be set to {value!r}")
            return
        super().__setattr__(name, value)

    def connect(self, signature, slot):
        """PythonQt's ``obj.connect("clicked()", slot)``."""
        name = signature.split("(", 1)[0]
        signal = super().__getattribute__(name)
        signal.connect(slot)
        return True

    def disconnect(self, signature, slot=None):
        signal = super().__getattribute__(signature.split("(", 1)[0])
        return signal.disconnect(slot) if slot is not None else signal.disconnect()


_OWN = {"connect": PythonQtStyle.connect, "disconnect": PythonQtStyle.disconnect,
        "exec_": lambda self, *args: self.exec(*args)}  # PythonQt's name for exec()
_WRAPPED: dict[type, type] = {}


def wrapped(cls: type) -> type:
    """The PythonQt-style subclass of a PySide6 QObject class (other classes are returned as they are)."""
    if not (isinstance(cls, type) and issubclass(cls, QtCore.QObject)) or issubclass(cls, PythonQtStyle):
        return cls
    if cls not in _WRAPPED:
        _WRAPPED[cls] = type(cls.__name__, (PythonQtStyle, cls), {"__module__": "qt"})
    return _WRAPPED[cls]


# ----------------------------------------------------------------------------------------------
# ctk and MRML widget stand-ins


class ctkCollapsibleButton(PythonQtStyle, QtWidgets.QGroupBox):
    """A titled section; ``collapsed`` hides its contents (as ctk's button does)."""

    def __init__(self, parent=None):
        QtWidgets.QGroupBox.__init__(self, parent)
        self._collapsed = False
        self._hidden = []  # the contents this button hid (widgets hidden by the panel stay hidden)

    def _get_text(self):
        return self.title

    def _set_text(self, text):
        self.setTitle(("\u25b8 " if self._collapsed else "\u25be ") + text.lstrip("\u25b8\u25be "))

    def _get_collapsed(self):
        return self._collapsed

    def _set_collapsed(self, collapsed):
        self._collapsed = bool(collapsed)
        self._set_text(self.title)
        self._apply()

    def _apply(self):
        if self._collapsed:
            for child in self.findChildren(QtWidgets.QWidget, options=QtCore.Qt.FindDirectChildrenOnly):
                if not child.isHidden():
                    child.hide()
                    self._hidden.append(child)
        else:
            for child in self._hidden:
                child.show()
            self._hidden = []

    def showEvent(self, event):
        self._apply()  # contents the loader added after "collapsed" was set
        QtWidgets.QGroupBox.showEvent(self, event)

    text = Property(str, _get_text, _set_text)
    collapsed = Property(bool, _get_collapsed, _set_collapsed)


class ctkPathLineEdit(PythonQtStyle, QtWidgets.QWidget):
    """A path field with ``currentPath`` and ``currentPathChanged(QString)``."""

    currentPathChanged = Signal(str)

    def __init__(self, parent=None):
        QtWidgets.QWidget.__init__(self, parent)
        layout = QtWidgets.QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self._edit = QtWidgets.QLineEdit(self)
        self._browse = QtWidgets.QToolButton(self)
        self._browse.setText("...")
        layout.addWidget(self._edit)
        layout.addWidget(self._browse)
        self._edit.editingFinished.connect(lambda: self.currentPathChanged.emit(self._edit.text()))

    def _get_path(self):
        return self._edit.text()

    def _set_path(self, path):
        path = str(path or "")
        if path != self._edit.text():
            self._edit.setText(path)
            self._edit.setCursorPosition(0)
            self.currentPathChanged.emit(path)

    currentPath = Property(str, _get_path, _set_path)


class qMRMLWidget(PythonQtStyle, QtWidgets.QWidget):
    mrmlSceneChanged = Signal(object)

    def __init__(self, parent=None):
        QtWidgets.QWidget.__init__(self, parent)
        self._scene = None

    def setMRMLScene(self, scene):
        self._scene = scene
        self.mrmlSceneChanged.emit(scene)

    def mrmlScene(self):
        return self._scene


class qMRMLNodeComboBox(PythonQtStyle, QtWidgets.QComboBox):
    """The scene's nodes of ``nodeTypes`` (subclasses only with ``showChildNodeTypes``; nodes hidden
    from editors never), "None" first with ``noneEnabled``; ``currentNodeChanged(vtkMRMLNode*)``."""

    currentNodeChanged = Signal(object)

    def __init__(self, parent=None):
        QtWidgets.QComboBox.__init__(self, parent)
        self._scene = None
        self._observers = []
        self._last_id = None
        self._refreshing = False
        self.currentIndexChanged.connect(self._on_index)

    def _flag(self, name, default):
        value = _QOBJECT_PROPERTY(self, name)
        return default if value is None else bool(value)

    def _node_types(self):
        value = _QOBJECT_PROPERTY(self, "nodeTypes")
        return list(value or [])

    def setMRMLScene(self, scene):
        if self._scene is not None:
            for tag in self._observers:
                self._scene.RemoveObserver(tag)
        self._scene, self._observers = scene, []
        if scene is not None:
            for event in (scene.NodeAddedEvent, scene.NodeRemovedEvent, scene.EndCloseEvent):
                self._observers.append(scene.AddObserver(event, lambda *args: self._refresh()))
        self._refresh()

    def _accepts(self, node):
        if node.GetHideFromEditors():
            return False
        show_children = self._flag("showChildNodeTypes", True)
        for class_name in self._node_types():
            if node.GetClassName() == class_name or (show_children and node.IsA(class_name)):
                return True
        return False

    def _refresh(self):
        if "_scene" not in self.__dict__:  # the widget is gone; the scene still sends its events
            return
        scene = self._scene
        self._refreshing = True
        try:
            current = self._last_id
            self.clear()
            if self._flag("noneEnabled", False):
                self.addItem("None", None)
            if scene is not None:
                for i in range(scene.GetNumberOfNodes()):
                    node = scene.GetNthNode(i)
                    if self._accepts(node):
                        self.addItem(node.GetName(), node.GetID())
            index = self.findData(current) if current else -1
            if index < 0:
                index = 0 if QtWidgets.QComboBox.count(self) else -1
            self.setCurrentIndex(index)
        finally:
            self._refreshing = False
        self._on_index(QtWidgets.QComboBox.currentIndex(self))

    def _on_index(self, index):
        if self._refreshing:
            return
        node_id = self.itemData(index) if index >= 0 else None
        if node_id != self._last_id:
            self._last_id = node_id
            self.currentNodeChanged.emit(self.currentNode())

    def currentNode(self):
        node_id = self.itemData(QtWidgets.QComboBox.currentIndex(self)) if QtWidgets.QComboBox.currentIndex(self) >= 0 else None
        return self._scene.GetNodeByID(node_id) if node_id and self._scene is not None else None

    def currentNodeID(self):
        node = self.currentNode()
        return node.GetID() if node is not None else ""

    def setCurrentNode(self, node):
        index = self.findData(node.GetID()) if node is not None else self.findData(None)
        if node is None and index < 0:
            index = -1
        self.setCurrentIndex(index)

    def setCurrentNodeID(self, node_id):
        self.setCurrentNode(self._scene.GetNodeByID(node_id) if node_id else None)


CUSTOM_WIDGETS = {cls.__name__: cls for cls in (ctkCollapsibleButton, ctkPathLineEdit, qMRMLWidget,
                                                 qMRMLNodeComboBox)}
#: properties of CTK/MRML widgets in the .ui that these stand-ins do not model (enum sets Qt's
#: loader cannot resolve); they are dropped before loading
_UNMODELLED = {"filters"}


class QUiLoader(PythonQtStyle, QtUiTools.QUiLoader):
    """Builds every widget of a .ui as a PythonQt-style class; makes the .ui's connections between
    the stand-ins' Python signals and slots itself."""

    def createWidget(self, class_name, parent=None, name=""):
        cls = CUSTOM_WIDGETS.get(class_name) or wrapped(getattr(QtWidgets, class_name, None))
        if cls is None or not isinstance(cls, type):
            return QtUiTools.QUiLoader.createWidget(self, class_name, parent, name)
        widget = cls(parent)
        widget.setObjectName(name)
        return widget

    def load(self, device, parent=None):
        data = bytes(device.readAll())
        root = ET.fromstring(data)
        connections = []
        for block in root.findall("connections"):
            for c in block.findall("connection"):
                connections.append(tuple(c.findtext(k) for k in ("sender", "signal", "receiver", "slot")))
            root.remove(block)
        for holder in root.iter():
            for prop in list(holder.findall("property")):
                if prop.get("name") in _UNMODELLED:
                    holder.remove(prop)
        buffer = QtCore.QBuffer()
        buffer.setData(QtCore.QByteArray(ET.tostring(root)))
        buffer.open(QtCore.QIODevice.ReadOnly)
        top = QtUiTools.QUiLoader.load(self, buffer, parent)
        if top is None:
            return None
        for sender, signal, receiver, slot in connections:
            source = top if QtCore.QObject.objectName(top) == sender else top.findChild(QtCore.QObject, sender)
            target = top if QtCore.QObject.objectName(top) == receiver else top.findChild(QtCore.QObject, receiver)
            if source is None or target is None:
                raise RuntimeError(f"the .ui connects {sender} to {receiver}, which it does not hold")
            getattr(source, signal.split("(")[0]).connect(getattr(target, slot.split("(")[0]))
        return top


# ----------------------------------------------------------------------------------------------
# the qt and ctk modules


def _qt_module() -> types.ModuleType:
    module = types.ModuleType("qt", "PySide6 with PythonQt's ways (GuidedSeg test adapter)")
    sources = (QtCore, QtGui, QtWidgets, QtTest)

    def __getattr__(name):
        for source in sources:
            if hasattr(source, name):
                value = wrapped(getattr(source, name))
                setattr(module, name, value)
                return value
        raise AttributeError(f"module 'qt' has no attribute {name!r}")

    module.__getattr__ = __getattr__
    module.QUiLoader = QUiLoader
    return module


def _ctk_module() -> types.ModuleType:
    module = types.ModuleType("ctk", "CTK widget stand-ins (GuidedSeg test adapter)")
    module.ctkCollapsibleButton = ctkCollapsibleButton
    module.ctkPathLineEdit = ctkPathLineEdit
    return module


# ----------------------------------------------------------------------------------------------
# slicer.app and the message boxes


class _ApplicationLogic:
    def __init__(self, scene):
        self.scene = scene

    def GetSelectionNode(self):
        node = self.scene.GetFirstNodeByClass("vtkMRMLSelectionNode")
        if node is None:
            node = self.scene.AddNewNodeByClass("vtkMRMLSelectionNode")
        return node


class _App:
    applicationName = "Slicer"

    def __init__(self, qapp, scene, temporary_path, settings_dir):
        self._qapp = qapp
        self.temporaryPath = str(temporary_path)
        self.slicerUserSettingsFilePath = str(Path(settings_dir) / "slicer.org" / "Slicer.ini")
        self._logic = _ApplicationLogic(scene)

    def processEvents(self):
        self._qapp.processEvents()

    def applicationLogic(self):
        return self._logic

    def topLevelWidgets(self):
        return self._qapp.topLevelWidgets()

    def testingEnabled(self):
        return False


class Adapter:
    """What :func:`install` set up; ``messages`` records every message box the panel showed,
    ``answers`` holds the answers the next confirmation boxes give (True when empty)."""

    def __init__(self, qapp, scene, segmentations_logic, temporary_path, settings_dir):
        import slicer
        import slicer.util

        self.qapp = qapp
        self.messages: list[tuple[str, str]] = []  # (kind, text)
        self.answers: list[bool] = []
        self.layers: list[dict] = []
        self._saved_modules = {name: sys.modules.get(name) for name in ("qt", "ctk")}
        self._saved_slicer = {name: getattr(slicer, name, None) for name in ("mrmlScene", "app", "modules")}
        self._saved_util = {}
        sys.modules["qt"], sys.modules["ctk"] = _qt_module(), _ctk_module()
        slicer.mrmlScene = scene
        slicer.app = _App(qapp, scene, temporary_path, settings_dir)
        slicer.modules = types.SimpleNamespace(segmentations=types.SimpleNamespace(logic=lambda: segmentations_logic))

        def record(kind):
            def show(text, *args, **kwargs):
                self.messages.append((kind, str(text)))
            return show

        def confirm(text, *args, **kwargs):
            self.messages.append(("confirm", str(text)))
            return self.answers.pop(0) if self.answers else True

        def layers(**kwargs):
            self.layers.append(kwargs)

        for name, value in (("errorDisplay", record("error")), ("warningDisplay", record("warning")),
                            ("infoDisplay", record("info")), ("confirmOkCancelDisplay", confirm),
                            ("setSliceViewerLayers", layers), ("selectModule", record("select module"))):
            self._saved_util[name] = getattr(slicer.util, name)
            setattr(slicer.util, name, value)

    def restore(self) -> None:
        import slicer
        import slicer.util

        for name, value in self._saved_util.items():
            setattr(slicer.util, name, value)
        for name, value in self._saved_slicer.items():
            if value is None:
                if hasattr(slicer, name):
                    delattr(slicer, name)
            else:
                setattr(slicer, name, value)
        for name, module in self._saved_modules.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module

    def in_dialog(self, opener, act, button: str) -> None:
        """Click ``opener``, which opens a modal dialog; in it run ``act(dialog)``, then click its push
        button labelled ``button`` (the dialog is rejected if it is still open after that)."""
        def run():
            dialog = self.qapp.activeModalWidget()
            try:
                act(dialog)
                pushed = [b for b in dialog.findChildren(QtWidgets.QPushButton)
                          if QtWidgets.QAbstractButton.text(b) == button]
                self.click(pushed[0])
            finally:
                if dialog is not None and dialog.isVisible():
                    dialog.reject()

        QtCore.QTimer.singleShot(200, run)
        self.click(opener)

    def close_panel(self, panel) -> None:
        """End a test's panel as Slicer closes a module (its children stopped), then undo the adapter."""
        panel.cleanup()
        panel.widget.close()
        panel.widget.deleteLater()
        self.process(0.05)
        self.restore()

    # driving the event loop ------------------------------------------------------------------
    def process(self, seconds: float = 0.0) -> None:
        """Run the event loop for ``seconds`` (at least one pass)."""
        deadline = QtCore.QDeadlineTimer(int(seconds * 1000))
        while True:
            self.qapp.processEvents(QtCore.QEventLoop.AllEvents, 20)
            if deadline.hasExpired():
                return
            QtCore.QThread.msleep(10)

    def wait_until(self, condition, timeout: float, what: str = "the condition"):
        """Run the event loop until ``condition()`` is true; AssertionError after ``timeout`` seconds."""
        deadline = QtCore.QDeadlineTimer(int(timeout * 1000))
        while True:
            self.qapp.processEvents(QtCore.QEventLoop.AllEvents, 20)
            value = condition()
            if value:
                return value
            if deadline.hasExpired():
                raise AssertionError(f"{what} did not happen within {timeout} s")
            QtCore.QThread.msleep(10)

    @staticmethod
    def click(widget) -> None:
        """A real mouse click in the middle of ``widget``."""
        QtTest.QTest.mouseClick(widget, QtCore.Qt.LeftButton)

    @staticmethod
    def screenshot(widget, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial.png")
        if not widget.grab().save(str(partial), "PNG"):
            raise OSError(f"{path}: the screenshot could not be written")
        os.replace(partial, path)
        return path


def install(scene, segmentations_logic, temporary_path, settings_dir) -> Adapter:
    """Start (or reuse) the QApplication on Qt's offscreen platform and give the module its names."""
    QtCore.QSettings.setDefaultFormat(QtCore.QSettings.IniFormat)
    QtCore.QSettings.setPath(QtCore.QSettings.IniFormat, QtCore.QSettings.UserScope, str(settings_dir))
    qapp = QtWidgets.QApplication.instance() or QtWidgets.QApplication([sys.argv[0], "-platform", "offscreen"])
    qapp.setOrganizationName("GuidedSegTest")
    qapp.setApplicationName(re.sub(r"\W", "", Path(str(settings_dir)).name) or "panel")
    return Adapter(qapp, scene, segmentations_logic, temporary_path, settings_dir)
