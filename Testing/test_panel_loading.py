"""The module loads as Slicer's scripted-module factory loads it after "Add module path" on a source
checkout's GuidedSeg/ folder: that folder alone on sys.path (no checkout root, no installed
GuidedSegLib), GuidedSeg.py executed as module "GuidedSeg", then its panel and logic used."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "GuidedSeg"


def run_isolated(body: str, module_dir: Path = MODULE) -> subprocess.CompletedProcess:
    """Run ``body`` in a fresh Python whose sys.path holds ``module_dir``, Python's own and site-packages,
    with every route to the checkout (its root on sys.path, the editable install's finder) removed."""
    prelude = textwrap.dedent(f"""
        import importlib.util, sys, types
        root, module_dir = {str(ROOT)!r}, {str(module_dir)!r}
        sys.path[:] = [module_dir] + [p for p in sys.path if p and p.rstrip("/") != root]  # Python's own + site
        sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in str(getattr(f, "__module__", "")).lower()]
        sys.path_hooks[:] = [h for h in sys.path_hooks if "editable" not in getattr(h, "__module__", "").lower()]
        sys.path_importer_cache.clear()
        for name in [n for n in sys.modules if n.split(".")[0] in ("GuidedSegLib", "Training")]:
            del sys.modules[name]
        assert importlib.util.find_spec("GuidedSegLib") is None, "GuidedSegLib is importable before loading"
        import slicer  # slicer-core; the application's base classes are stood in for below
        base = types.ModuleType("slicer.ScriptedLoadableModule")
        class ScriptedLoadableModule:
            def __init__(self, parent):
                self.parent = parent
        for name in ("ScriptedLoadableModuleLogic", "ScriptedLoadableModuleTest", "ScriptedLoadableModuleWidget"):
            setattr(base, name, type(name, (), {{}}))
        base.ScriptedLoadableModule = ScriptedLoadableModule
        sys.modules["slicer.ScriptedLoadableModule"] = base
        # what qSlicerScriptedUtils::loadSourceAsModule does with GuidedSeg.py
        spec = importlib.util.spec_from_file_location("GuidedSeg", module_dir + "/GuidedSeg.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["GuidedSeg"] = module
        spec.loader.exec_module(module)
    """)
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(body)], capture_output=True, text=True,
                          timeout=180, check=False, cwd=module_dir)


def test_add_module_path_on_the_checkout_finds_the_library_and_the_trainer():
    done = run_isolated("""
        from pathlib import Path
        parent = types.SimpleNamespace()
        module.GuidedSeg(parent)
        assert parent.title == "GuidedSeg", parent.title
        from GuidedSegPanel import commands
        from GuidedSegPanel.logic import PanelLogic
        import GuidedSegLib
        assert Path(GuidedSegLib.__file__).resolve() == Path(root) / "GuidedSegLib" / "__init__.py"
        scene = slicer.vtkMRMLScene()
        segmentations = slicer.vtkSlicerSegmentationsModuleLogic()
        segmentations.SetMRMLScene(scene)
        logic = PanelLogic(scene, segmentations, python=sys.executable)
        assert logic.state().train_script_found
        assert commands.train_script() == Path(root) / "Training" / "train.py"
        assert commands.child_environment({}).get("PYTHONPATH") == root
        # the checkout's root never went on Slicer's path: "Training" is no importable package here
        assert root not in [p.rstrip("/") for p in sys.path], sys.path
        assert importlib.util.find_spec("Training") is None
        print("ok")
    """)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr


def test_the_child_command_runs_from_what_the_panel_found():
    """The child (Slicer's Python, here without the editable install) imports GuidedSegLib through
    the PYTHONPATH the panel gives it."""
    done = run_isolated("""
        import os, subprocess
        from GuidedSegPanel import commands
        env = commands.child_environment({"PATH": os.environ.get("PATH", "")})
        child = subprocess.run([sys.executable, "-S", "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                                "import GuidedSegLib, GuidedSegLib.errors; print(GuidedSegLib.__file__)",
                                env["PYTHONPATH"]], capture_output=True, text=True, env=env, check=False)
        assert child.returncode == 0, child.stderr
        print(child.stdout.strip())
    """)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()).resolve() == ROOT / "GuidedSegLib" / "__init__.py"


def test_a_module_folder_without_its_library_says_where_it_looked(tmp_path):
    import shutil

    lonely = tmp_path / "GuidedSeg"
    shutil.copytree(MODULE, lonely, ignore=shutil.ignore_patterns("__pycache__"))
    done = run_isolated("""
        from GuidedSegPanel import logic
    """, module_dir=lonely)
    assert done.returncode != 0
    assert "GuidedSeg cannot find its library GuidedSegLib" in done.stderr and str(tmp_path / "GuidedSegLib") in \
        done.stderr, done.stderr


@pytest.mark.parametrize("layout", ["checkout", "installed"])
def test_train_script_is_found_in_both_layouts(tmp_path, layout, monkeypatch):
    sys.path.insert(0, str(MODULE))
    from GuidedSegPanel import commands

    train = (tmp_path / "Training" if layout == "checkout" else tmp_path / commands.INSTALLED_TRAINING / "Training")
    train.mkdir(parents=True)
    (train / "train.py").write_text("")
    monkeypatch.setattr(commands, "library_root", lambda: tmp_path)
    assert commands.train_script() == train / "train.py"
