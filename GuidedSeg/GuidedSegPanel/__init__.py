"""The GuidedSeg panel's parts, one job per module.

Plain Python (importable in pytest with slicer-core; no Qt):
    process     child process runner: progress lines, Cancel of the whole process group
    commands    the command lines of segment / train / device probe and their environment
    models      the bundles in a models folder, with labels and validation Dice
    terminology standard codes (SNOMED CT) for segment names
    nodes       MRML nodes <-> files (volume out, label map in, segmentation out)
    export      which organs an export records as annotated, and writing it into a case store
    jobs        a Segment or Train run: files, child process, result
    logic       the facade the widget drives: settings, models, jobs, export, state
    parameters  the panel's settings in the scene's parameter node
    state       what the panel shows and enables, from plain inputs
    install     PyTorch / MONAI on demand, after asking
    selftest    a tiny untrained bundle for the self-test and end-to-end tests
Qt (inside Slicer only):
    widget      the panel itself, built from Resources/UI/GuidedSeg.ui
"""

import importlib.util
import sys
from pathlib import Path


def _find_library() -> None:
    """Make ``import GuidedSegLib`` work however the module was added to Slicer.

    Installed from the Extensions Manager (or a CMake build), GuidedSegLib lies beside GuidedSeg.py
    in Slicer's scripted-modules folder, which Slicer puts on ``sys.path``. Added with "Add module
    path" on a source checkout's ``GuidedSeg/`` folder, Slicer puts only that folder on ``sys.path``
    and GuidedSegLib is one level up: it is then loaded from there by its file location, so the
    checkout's root (which also holds ``Training/``, a name other packages may use) never goes on
    ``sys.path``. The child processes get the checkout's root on their own PYTHONPATH.
    """
    if "GuidedSegLib" in sys.modules or importlib.util.find_spec("GuidedSegLib") is not None:
        return
    package = Path(__file__).resolve().parents[2] / "GuidedSegLib"
    init = package / "__init__.py"
    if not init.is_file():
        raise ImportError(f"GuidedSeg cannot find its library GuidedSegLib: not importable, and not at {package} "
                          "(the folder beside GuidedSeg/ in a source checkout)")
    spec = importlib.util.spec_from_file_location("GuidedSegLib", init, submodule_search_locations=[str(package)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["GuidedSegLib"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["GuidedSegLib"]
        raise


_find_library()
