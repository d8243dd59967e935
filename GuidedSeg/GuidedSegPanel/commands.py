"""Command lines of the child processes the panel runs, and the environment they run in.

The children use Slicer's own Python (``PythonSlicer``; ``sys.executable`` in tests) with the
folder that holds GuidedSegLib (and Training/, beside it in the installed extension) on
PYTHONPATH, so the same code runs in Slicer, a terminal and the tests.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

SEGMENT_STAGES = {
    "load": "Loading the model",
    "read": "Reading the volume",
    "preprocess": "Preprocessing",
    "infer": "Running the network",
    "restore": "Placing the result on the volume's grid",
    "write": "Writing the result",
    "done": "Done",
}
TRAIN_STAGES = {
    "phantoms": "Writing phantoms",
    "prepare-train": "Preparing training cases",
    "prepare-validation": "Preparing validation cases",
    "train": "Training",
    "validate": "Validating",
    "done": "Done",
}
SUGGEST_STAGES = {"suggest": "Ranking the unlabeled cases", "done": "Done"}


def library_root() -> Path:
    """The folder holding the GuidedSegLib package (the repository, or Slicer's scripted-modules folder)."""
    import GuidedSegLib

    return Path(GuidedSegLib.__file__).resolve().parent.parent


#: where the installed extension keeps Training/ (beside GuidedSegLib, one folder down, so that the
#: name "Training" is not an importable package on Slicer's sys.path)
INSTALLED_TRAINING = "GuidedSeg-training"


def train_script() -> Path:
    """Training/train.py: beside GuidedSegLib in a checkout, under GuidedSeg-training/ when installed."""
    root = library_root()
    for candidate in (root / "Training" / "train.py", root / INSTALLED_TRAINING / "Training" / "train.py"):
        if candidate.is_file():
            return candidate
    return root / "Training" / "train.py"


def python_executable() -> str:
    """Slicer's Python launcher when running inside Slicer, else this interpreter."""
    launcher = shutil.which("PythonSlicer")
    if launcher:
        return launcher
    for name in ("PythonSlicer", "PythonSlicer.exe"):  # beside the Slicer executable
        candidate = Path(sys.executable).with_name(name)
        if candidate.is_file():
            return str(candidate)
    return sys.executable


def child_environment(base: dict | None = None) -> dict:
    """This process's environment with GuidedSegLib importable and unbuffered output."""
    env = dict(os.environ if base is None else base)
    root = str(library_root())
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in parts if p != root])
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("PYTHONIOENCODING", "utf-8")
    return env


def segment_command(python: str, bundle: str | os.PathLike, image: str | os.PathLike, output: str | os.PathLike,
                    device: str = "cpu", ensemble: bool = False, lcc: bool = False) -> list[str]:
    argv = [python, "-m", "GuidedSegLib.cli", "segment", "--model", str(bundle), "--input", str(image),
            "--output", str(output), "--device", device]
    if ensemble:
        argv.append("--ensemble")
    if lcc:
        argv.append("--lcc")
    return argv + ["--progress", "json"]


# The starter model trains what the README's demo trains (Testing/BENCHMARKS.md: 8 of 13 phantom
# organs at test Dice 0.5 or more): a supervised U-Net, 1000 steps, on 8 labeled phantoms.
STARTER_SETTINGS = ("phantoms.labeled=8", "optim.iterations=1000", "data.augment=false")


def train_command(python: str, store: str | os.PathLike | None, output: str | os.PathLike, method: str = "guidednet",
                  device: str | None = None, script: str | os.PathLike | None = None,
                  settings: tuple[str, ...] = ()) -> list[str]:
    """train.py on a case store; without a store, on fresh synthetic phantoms (the starter model).
    ``settings`` are ``section.key=value`` overrides."""
    argv = [python, str(script or train_script())] + (["--store", str(store)] if store else []) + [
        "--output", str(output), "--progress", "json", "--method", method]
    if device:
        argv += ["--device", device]
    return argv + list(settings)


def finetune_command(python: str, bundle: str | os.PathLike, store: str | os.PathLike, output: str | os.PathLike,
                     device: str | None = None, script: str | os.PathLike | None = None,
                     settings: tuple[str, ...] = ()) -> list[str]:
    """train.py --init-from: a warm start from ``bundle`` on the store as it is now (the schedule of
    Training/configs/finetune.yaml; ``settings``: ``section.key=value`` overrides)."""
    argv = [python, str(script or train_script()), "--init-from", str(bundle), "--store", str(store),
            "--output", str(output), "--progress", "json"]
    return argv + (["--device", device] if device else []) + list(settings)


def suggest_command(python: str, bundle: str | os.PathLike, store: str | os.PathLike, device: str = "cpu") -> list[str]:
    """guidedseg suggest: rank the store's unlabeled cases with ``bundle`` (saved beside dataset.json)."""
    return [python, "-m", "GuidedSegLib.cli", "suggest", "--model", str(bundle), "--store", str(store),
            "--device", device, "--progress", "json"]


# The device probe runs in a child so that Slicer itself never imports torch (or CUDA).
_PROBE = """
import json
from importlib import metadata
devices = [{"id": "cpu", "name": "CPU"}]
def version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
try:
    import torch
except ImportError:
    print(json.dumps({"stage": "done", "progress": 1.0, "devices": devices, "torch": None,
                      "monai": version("monai")}))
    raise SystemExit(0)
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        devices.append({"id": f"cuda:{i}", "name": f"GPU {i}: {torch.cuda.get_device_name(i)}"})
mps = getattr(torch.backends, "mps", None)
if mps is not None and mps.is_available():
    devices.append({"id": "mps", "name": "Apple GPU (MPS)"})
print(json.dumps({"stage": "done", "progress": 1.0, "devices": devices, "torch": torch.__version__,
                  "cuda": torch.version.cuda, "monai": version("monai")}))
"""


def device_probe_command(python: str) -> list[str]:
    return [python, "-c", _PROBE]


def devices_from_probe(record: dict | None) -> list[tuple[str, str]]:
    """(device id, display name) pairs from the probe's "done" record; CPU when it said nothing."""
    devices = []
    for item in (record or {}).get("devices") or []:
        if isinstance(item, dict) and isinstance(item.get("id"), str):
            devices.append((item["id"], str(item.get("name") or item["id"])))
    return devices or [("cpu", "CPU")]


def environment_from_probe(record: dict | None) -> dict[str, str | None]:
    """The versions the probe found: torch, the CUDA it was built for (None: a CPU build), MONAI."""
    record = record or {}
    return {key: (str(record[key]) if record.get(key) else None) for key in ("torch", "cuda", "monai")}


def environment_text(environment: dict | None, device_name: str | None) -> str:
    """One line for the panel, e.g. "PyTorch 2.13.0 (CUDA 12.6), MONAI 1.6.1. Segment runs on: GPU 0: ..."."""
    if not environment:
        return "Checking PyTorch and the devices..."
    if not environment.get("torch"):
        return "PyTorch is not installed in Slicer's Python."
    build = f"CUDA {environment['cuda']}" if environment.get("cuda") else "CPU build"
    monai = f"MONAI {environment['monai']}" if environment.get("monai") else "no MONAI"
    return f"PyTorch {environment['torch']} ({build}), {monai}. Segment runs on: {device_name or 'CPU'}"


#: what a child's error says when the GPU ran out of memory (PyTorch's CUDA and MPS messages)
OUT_OF_MEMORY = ("out of memory", "outofmemoryerror", "cuda_error_out_of_memory", "mps backend out of memory")


def out_of_memory(error: str | None) -> bool:
    return bool(error) and any(marker in error.lower() for marker in OUT_OF_MEMORY)


def stage_text(stage: str, record: dict, stages: dict[str, str]) -> str:
    """What the panel shows for a progress record, e.g. "Training: iteration 120, loss 0.412, 3 min left"."""
    text = stages.get(stage, stage.replace("-", " ").capitalize())
    if stage == "message":
        return str(record.get("text", ""))
    if stage == "error":  # the CLI repeats its error line as a record before exiting
        return f"Error: {record.get('message', '')}".rstrip(": ")
    if stage == "stopped":
        return "Stopped"
    details = []
    if "iteration" in record:
        details.append(f"iteration {record['iteration']}")
    if isinstance(record.get("loss"), (int, float)):
        details.append(f"loss {record['loss']:.3f}")
    eta = record.get("eta_s")
    if isinstance(eta, (int, float)) and eta > 0:
        details.append(f"{eta / 60:.0f} min left" if eta >= 90 else f"{eta:.0f} s left")
    return f"{text}: {', '.join(details)}" if details else text
