"""Material for the module's self-test and the end-to-end pytest: a tiny, untrained model bundle.

:func:`write_tiny_bundle` imports torch, so Slicer runs it in a child process
(:func:`tiny_bundle_command`); the test never needs a trained model, only one the real CLI loads.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_tiny_bundle(folder: str | os.PathLike, labels: dict[int, str], seed: int = 0) -> Path:
    """A one-network bundle with a 2-level U-Net (4 and 8 channels) on 6 mm voxels: loads and runs
    in a second on a CPU; its output is whatever its random weights say."""
    import torch

    import GuidedSegLib
    from GuidedSegLib.bundle import write_bundle
    from GuidedSegLib.labels import label_colour
    from GuidedSegLib.networks import UNet3D
    from GuidedSegLib.preprocessing import PreprocessingPlan

    torch.manual_seed(seed)
    names = {0: "background", **{int(v): str(n) for v, n in labels.items() if int(v) != 0}}
    network = UNet3D(1, len(names), widths=(4, 8), dropout=0.0, feature_layer=1)
    plan = PreprocessingPlan(target_spacing=(6.0, 6.0, 6.0), source="selftest")
    metadata = {
        "name": "tiny-selftest",
        "library_version": GuidedSegLib.__version__,
        "method": "supervised",
        "network": network.config(),
        "labels": {str(v): n for v, n in sorted(names.items())},
        "colours": {str(v): list(label_colour(n)) for v, n in sorted(names.items()) if v},
        "preprocessing": plan.to_dict(),
        "patch": [16, 16, 16],
        "stride": [8, 8, 8],
        "training": {"note": "untrained: for tests only"},
        "validation": {"mean_dice": 0.0, "per_organ": {}},
        "parent": None,
    }
    return write_bundle(folder, {"A": network}, metadata)


def tiny_bundle_command(python: str, folder: str | os.PathLike, labels: dict[int, str]) -> list[str]:
    """Run :func:`write_tiny_bundle` in a child Python (with this package importable)."""
    package_parent = str(Path(__file__).resolve().parent.parent)
    code = (f"import sys; sys.path.insert(0, {package_parent!r}); "
            "from GuidedSegPanel.selftest import write_tiny_bundle; "
            f"write_tiny_bundle({str(folder)!r}, {dict(labels)!r})")
    return [python, "-c", code]
