"""The Slicer module's files: they compile under Python 3.10 rules, load without torch or MONAI,
the CMake list ships every panel file, and the .ui holds every control the widget uses."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "GuidedSeg"
PANEL_FILES = sorted((MODULE / "GuidedSegPanel").glob("*.py"))
HEAVY = ("torch", "monai", "safetensors")


def test_module_files_compile_under_python_310_rules():
    for path in [MODULE / "GuidedSeg.py", *PANEL_FILES]:
        ast.parse(path.read_text(encoding="utf-8"), filename=str(path), feature_version=(3, 10))


def test_nothing_heavy_is_imported_at_module_level():
    for path in [MODULE / "GuidedSeg.py", *PANEL_FILES]:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:  # module level only; functions may import what they need when run
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            heavy = [n for n in names if n.split(".")[0] in HEAVY]
            assert not heavy, f"{path.name} imports {heavy} at load"


def test_module_loads_without_torch_and_is_listed_under_segmentation():
    """GuidedSeg.py and the Qt-free panel modules import with torch and MONAI made unimportable;
    Slicer's ScriptedLoadableModule base classes are stood in for (they need the application)."""
    code = textwrap.dedent(f"""
        import importlib.abc, sys, types
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {HEAVY!r}:
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        sys.path[:0] = [{str(MODULE)!r}, {str(ROOT)!r}]
        import slicer  # slicer-core
        base = types.ModuleType("slicer.ScriptedLoadableModule")
        class ScriptedLoadableModule:
            def __init__(self, parent):
                self.parent = parent
        for name in ("ScriptedLoadableModuleLogic", "ScriptedLoadableModuleTest", "ScriptedLoadableModuleWidget"):
            setattr(base, name, type(name, (), {{}}))
        base.ScriptedLoadableModule = ScriptedLoadableModule
        sys.modules["slicer.ScriptedLoadableModule"] = base
        import GuidedSeg
        for name in ("commands", "export", "install", "jobs", "logic", "models", "nodes", "parameters",
                     "process", "selftest", "state", "terminology"):
            __import__("GuidedSegPanel." + name)
        parent = types.SimpleNamespace()
        GuidedSeg.GuidedSeg(parent)
        assert parent.categories == ["Segmentation"], parent.categories
        assert not getattr(parent, "hidden", False), "the module is hidden"
        assert "Export corrected labels" in parent.helpText and parent.acknowledgementText
        from GuidedSegPanel import install
        assert [r.module for r in install.missing()][:2] == ["torch", "monai"]
        loaded = [m for m in sys.modules if m.split(".")[0] in {HEAVY!r}]
        assert not loaded, loaded
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_cmake_ships_every_panel_file_and_the_ui():
    cmake = (MODULE / "CMakeLists.txt").read_text()
    scripts = re.search(r"set\(MODULE_PYTHON_SCRIPTS(.*?)\)", cmake, re.DOTALL).group(1).split()
    assert sorted(s for s in scripts if s.startswith("GuidedSegPanel/")) == \
        sorted(f"GuidedSegPanel/{p.name}" for p in PANEL_FILES)
    resources = re.search(r"set\(MODULE_PYTHON_RESOURCES(.*?)\)", cmake, re.DOTALL).group(1).split()
    assert "Resources/UI/${MODULE_NAME}.ui" in resources and "Resources/Icons/${MODULE_NAME}.png" in resources
    assert "WITH_GENERIC_TESTS" in cmake and "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in cmake
    assert (MODULE / "Resources" / "Icons" / "GuidedSeg.png").is_file()


def test_ui_file_holds_every_control_the_widget_uses():
    tree = ET.parse(MODULE / "Resources" / "UI" / "GuidedSeg.ui")
    widgets = {w.get("name"): w.get("class") for w in tree.iter("widget")}
    declared = {c.findtext("class") for c in tree.iter("customwidget")}
    used = set(re.findall(r"\bui\.(\w+)", (MODULE / "GuidedSegPanel" / "widget.py").read_text()))
    assert used and used <= set(widgets), f"missing from the .ui: {sorted(used - set(widgets))}"
    custom = {cls for cls in widgets.values() if cls and cls[0] in "cq" and not cls.startswith("Q")}
    assert custom <= declared, f"undeclared custom widgets: {custom - declared}"
    assert widgets["inputVolumeSelector"] == widgets["segmentationSelector"] == "qMRMLNodeComboBox"
    receivers = {c.findtext("receiver") for c in tree.iter("connection")}
    assert {"inputVolumeSelector", "segmentationSelector"} <= receivers  # they get the scene
