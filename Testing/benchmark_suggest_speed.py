"""Benchmark (a script, not a test): seconds per case of the ranking pass of ``guidedseg suggest``.

Both networks on every window, then the per-organ scores, on a synthetic volume of the size an
OpenKBP case has after the issue-18 plan (3.906 x 3.906 x 3 mm: about 107 x 160 x 160, z y x),
with untrained networks of the benchmarks' size (widths [8..128], patch 64^3, 8 classes): the
cost does not depend on the weights. Random noise fills the volume, so the body box is all of it
(an upper bound for a real scan). Reading and preprocessing the image are not counted.

    OMP_NUM_THREADS=1 python Testing/benchmark_suggest_speed.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from GuidedSegLib.bundle import write_bundle  # noqa: E402
from GuidedSegLib.inference import Predictor  # noqa: E402
from GuidedSegLib.networks import build_network  # noqa: E402
from GuidedSegLib.preprocessing import PRESETS  # noqa: E402
from GuidedSegLib.suggest import organ_scores  # noqa: E402


def main(cases: int = 29) -> None:
    spec = {"architecture": "unet3d", "in_channels": 1, "out_channels": 8, "widths": [8, 16, 32, 64, 128],
            "dropout": 0.0, "feature_layer": 4}
    metadata = {"network": spec, "labels": {str(i): f"organ{i}" if i else "background" for i in range(8)},
                "preprocessing": PRESETS["guidednet-paper"].to_dict(), "patch": [64, 64, 64], "stride": [32, 32, 32]}
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        bundle = write_bundle(Path(folder) / "bundle", {"A": build_network(spec), "B": build_network(spec)}, metadata)
        predictor = Predictor(bundle, ensemble=True)
        volume = np.random.default_rng(0).normal(0, 1, (107, 160, 160)).astype(np.float32)
        for stride, name in ((predictor.patch, "suggest's pass (stride = patch)"), ((32, 32, 32), "half overlap")):
            predictor.stride = tuple(stride)
            began = time.monotonic()
            organ_scores(predictor.probabilities(volume, separate=True), 8)
            seconds = time.monotonic() - began
            print(f"{name}: {seconds:.1f} s per case, {cases} cases {cases * seconds / 60:.1f} min "
                  f"({torch.get_num_threads()} threads)", flush=True)


if __name__ == "__main__":
    main()
