"""PyTorch, MONAI and friends in Slicer's Python: found without importing, installed only when asked.

Nothing here imports torch or MONAI: :func:`missing` asks ``importlib.util.find_spec``, so the
module loads (and says what is missing) in a Slicer without them. :func:`install` asks the user
first and then installs PyTorch through the PyTorch Utils extension when it is there (it picks
the build matching the GPU and driver), else with pip, and the rest with pip.
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


def question(requirements: list[Requirement]) -> str:
    names = ", ".join(r.package for r in requirements)
    size = "about 1-3 GB" if any(r.module == "torch" for r in requirements) else "a few MB"
    return (f"GuidedSeg needs {names} in Slicer's Python to segment and train. Install them now? "
            f"This downloads {size} and can take several minutes; Slicer may not respond meanwhile.")


class InstallDeclined(Exception):
    """The user said no; nothing was installed."""


def install(
    requirements: list[Requirement],
    confirm: Callable[[str], bool],
    pip_install: Callable[[str], None],
    install_torch: Callable[[str], bool] | None = None,
) -> list[str]:
    """Install ``requirements`` after ``confirm`` says yes; returns the pip specs installed.

    ``install_torch(version_requirement)`` is PyTorch Utils' installer where that extension is
    present (it returns False when it could not install); without it torch comes from pip.
    Raises InstallDeclined when the user says no, RuntimeError naming the package that failed.
    """
    if not requirements:
        return []
    if not confirm(question(requirements)):
        raise InstallDeclined("Not installed: Segment and Train need these packages.")
    done = []
    for requirement in requirements:
        try:
            if requirement.module == "torch" and install_torch is not None:
                if not install_torch(TORCH_REQUIREMENT):
                    raise RuntimeError("PyTorch Utils did not install PyTorch")
            else:
                pip_install(requirement.spec)
        except Exception as error:  # pip and PyTorch Utils fail in many ways; say which package
            raise RuntimeError(f"Installing {requirement.spec} failed: {error}") from error
        done.append(requirement.spec)
    importlib.invalidate_caches()
    return done


def slicer_torch_installer() -> Callable[[str], bool] | None:
    """PyTorch Utils' installer inside Slicer, or None when that extension is not installed."""
    try:
        import PyTorchUtils  # the PyTorch extension's module (Slicer only)
    except ImportError:
        return None

    def install_torch(version: str) -> bool:
        logic = PyTorchUtils.PyTorchUtilsLogic()
        return logic.installTorch(askConfirmation=False, torchVersionRequirement=version) is not None

    return install_torch
