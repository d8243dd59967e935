"""PyTorch, MONAI and friends in Slicer's Python: found without importing, installed only when asked.

Nothing here imports torch or MONAI: :func:`missing` asks ``importlib.util.find_spec``, so the
module loads (and says what is missing) in a Slicer without them. :func:`install` is one action:
one question, then PyTorch through the PyTorch Utils extension when it is there (light-the-torch
picks the build for the GPU and driver; no torchvision, and Slicer's process never imports torch),
else one pip call for the CPU or CUDA build the user chose; then every other package in one call
(``slicer.packaging.pip_ensure`` where Slicer has it, 5.12; one ``pip_install`` on 5.10).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

TORCH_REQUIREMENT = ">=2.2"


@dataclass(frozen=True)
class Requirement:
    module: str  # import name
    spec: str  # pip requirement

    @property
    def package(self) -> str:
        return self.spec.split(">")[0].split("=")[0].split("<")[0]


#: what the child processes (segment, train) import; Slicer ships numpy, SimpleITK and scipy
REQUIREMENTS = (
    Requirement("torch", f"torch{TORCH_REQUIREMENT}"),
    Requirement("monai", "monai>=1.3"),
    Requirement("safetensors", "safetensors>=0.4"),
    Requirement("yaml", "pyyaml>=6"),
    Requirement("slicerio", "slicerio>=1.0"),
    Requirement("SimpleITK", "SimpleITK>=2.2"),
    Requirement("scipy", "scipy>=1.10"),
)


def missing(find_spec: Callable = importlib.util.find_spec) -> list[Requirement]:
    """The requirements not importable here (nothing is imported to find out)."""
    out = []
    for requirement in REQUIREMENTS:
        try:
            found = find_spec(requirement.module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            out.append(requirement)
    return out


#: pip arguments for each torch build the user can choose when PyTorch Utils is not there
TORCH_BUILDS = {
    "cuda": "--index-url https://download.pytorch.org/whl/cu126",  # NVIDIA GPU (driver 525 or later)
    "cpu": "--index-url https://download.pytorch.org/whl/cpu",
}


def question(requirements: list[Requirement], torch_build: str | None = None) -> str:
    names = ", ".join(r.package for r in requirements)
    size = "about 1-3 GB" if any(r.module == "torch" for r in requirements) else "a few MB"
    build = {"cuda": " (PyTorch's CUDA build, for an NVIDIA GPU)", "cpu": " (PyTorch's CPU-only build)"}.get(
        torch_build or "", "")
    return (f"GuidedSeg needs {names}{build} in Slicer's Python to segment and train. Install them now? "
            f"This downloads {size} and can take several minutes; Slicer may not respond meanwhile.")


class InstallDeclined(Exception):
    """The user said no; nothing was installed."""


def torch_pip_arguments(torch_build: str | None = None) -> str:
    """The one pip_install argument string that installs torch (the chosen build)."""
    if torch_build is not None and torch_build not in TORCH_BUILDS:
        raise ValueError(f"torch build {torch_build!r} is not one of {sorted(TORCH_BUILDS)}")
    extra = TORCH_BUILDS.get(torch_build or "")
    return f"torch{TORCH_REQUIREMENT}" + (f" {extra}" if extra else "")


def install(
    requirements: list[Requirement],
    confirm: Callable[[str], bool],
    pip_install: Callable[[str], None],
    install_torch: Callable[[str], bool] | None = None,
    pip_ensure: Callable[[list[str]], None] | None = None,
    torch_build: str | None = None,
) -> list[str]:
    """Install ``requirements`` after ``confirm`` says yes; returns the pip specs installed.

    Torch: ``install_torch(version_requirement)`` (PyTorch Utils, where present; False when it
    could not install), else one ``pip_install`` of the ``torch_build`` ("cuda", "cpu", or None for
    PyPI's default). The rest: one ``pip_ensure(specs)`` when given, else one ``pip_install`` of
    them all. Raises InstallDeclined when the user says no, RuntimeError naming what failed.
    """
    if not requirements:
        return []
    if not confirm(question(requirements, None if install_torch else torch_build)):
        raise InstallDeclined("Not installed: Segment and Train need these packages.")
    done = []
    torch = [r for r in requirements if r.module == "torch"]
    others = [r.spec for r in requirements if r.module != "torch"]
    if torch:
        try:
            if install_torch is not None:
                if not install_torch(TORCH_REQUIREMENT):
                    raise RuntimeError("PyTorch Utils did not install PyTorch")
            else:
                pip_install(torch_pip_arguments(torch_build))
        except Exception as error:  # pip and PyTorch Utils fail in many ways; say what
            raise RuntimeError(f"Installing {torch[0].spec} failed: {error}") from error
        done.append(torch[0].spec)
    if others:
        try:
            if pip_ensure is not None:
                pip_ensure(others)
            else:
                pip_install(" ".join(others))
        except Exception as error:
            raise RuntimeError(f"Installing {', '.join(others)} failed: {error}") from error
        done += others
    importlib.invalidate_caches()
    return done


def slicer_torch_installer() -> Callable[[str], bool] | None:
    """PyTorch Utils' installer inside Slicer, or None when that extension is not installed.

    It runs light-the-torch (the tool PyTorch Utils uses to pick the build for the GPU and driver)
    as a child process for torch alone: no torchvision, and no ``import torch`` in Slicer's process,
    which PyTorchUtilsLogic.installTorch() does when it returns. Older PyTorch Utils without
    these helpers fall back to installTorch().
    """
    try:
        import PyTorchUtils  # the PyTorch extension's module (Slicer only)
    except ImportError:
        return None
    logic_class = PyTorchUtils.PyTorchUtilsLogic

    def install_torch(version: str) -> bool:
        import slicer

        run_module = getattr(slicer.util, "_executePythonModule", None)
        ensure_ltt = getattr(logic_class, "_installLightTheTorch", None)
        if run_module is None or ensure_ltt is None:
            return logic_class().installTorch(askConfirmation=False, torchVersionRequirement=version) is not None
        if importlib.util.find_spec("light_the_torch") is None:
            ensure_ltt()
        run_module("light_the_torch", ["install", f"torch{version}"])
        importlib.invalidate_caches()
        return importlib.util.find_spec("torch") is not None

    return install_torch


def slicer_pip_ensure() -> Callable[[list[str]], None] | None:
    """Slicer 5.12's ``slicer.packaging.pip_ensure`` for a list of pip specs (asked already, so it
    does not ask again), or None on Slicer versions without it."""
    try:
        import slicer
    except ImportError:
        return None
    ensure = getattr(getattr(slicer, "packaging", None), "pip_ensure", None)
    if ensure is None:
        return None

    def pip_ensure(specs: list[str]) -> None:
        from packaging.requirements import Requirement as PipRequirement

        ensure([PipRequirement(s) for s in specs], prompt_install=False, requester="GuidedSeg")

    return pip_ensure
