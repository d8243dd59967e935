"""Diagnostic (a script, not a test): per-class voxel recall of a GuidedNet run's head and of its
CGMM posterior G on the store's labeled cases, with frequency and with uniform mixing
weights (background recall counts only what the labels call background: on partially
annotated cases that includes unannotated organs). A class whose G recall is near 0 while the
head of a supervised run learns it is one the CGMM terms teach the head to miss; the overall
voxel accuracy in log.csv (acc_g, acc_head) is dominated by background and hides it.

    OMP_NUM_THREADS=1 python Testing/probe_cgmm_recall.py runs/phB/guidednet-seed0 --store runs/phB/store

Reads ``RUN/checkpoint.pt`` (the networks and the mixture memory) and ``RUN/bundle`` (the plan).
Each case is run whole through network A, cropped to a multiple of 16 voxels.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from GuidedSegLib.bundle import load_networks  # noqa: E402
from GuidedSegLib.cgmm import MixtureMemory, log_posterior  # noqa: E402
from GuidedSegLib.imageio import read_image  # noqa: E402
from GuidedSegLib.preprocessing import PreprocessingPlan, preprocess  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--cases", type=int, default=4, help="labeled cases to probe (default 4)")
    args = parser.parse_args()

    state = torch.load(args.run / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]
    metadata, networks = load_networks(args.run / "bundle", "cpu", ["A"])
    plan = PreprocessingPlan.from_dict(metadata["preprocessing"])
    names = list(metadata["labels"].values())
    k = len(names)
    lookup = np.full(max(int(v) for v in metadata["labels"]) + 2, -1, np.int64)
    lookup[[int(v) for v in metadata["labels"]]] = np.arange(k)
    heads = {"head": None}
    if "memory.A.share" in state:
        memory = MixtureMemory(k, state["memory.A.mean"].shape[1])
        memory.load_state_dict({key[len("memory.A."):]: value for key, value in state.items()
                                if key.startswith("memory.A.")})
        heads["G (frequency mixing)"] = memory.current("frequency")
        heads["G (uniform mixing)"] = memory.current("uniform")
        trained = (yaml.safe_load((args.run / "config.yaml").read_text()).get("objective") or {}).get("mixing")
        share = memory.share
        weights = " ".join(f"{n}={1000 * float(w) / float(share.sum()):.1f}" for n, w in zip(names, share))
        print(f"the run trained with {trained} mixing; frequency mixing weights (per mille): {weights}")
    counts = {name: np.zeros((k, 2)) for name in heads}
    dataset = json.loads((args.store / "dataset.json").read_text())
    cases = [c for c in dataset["training"] if c.get("label")][:args.cases]
    for case in cases:
        prepared = preprocess(read_image(args.store / case["image"]), plan)
        label = sitk.Resample(read_image(args.store / case["label"]), prepared.image, sitk.Transform(),
                              sitk.sitkNearestNeighbor)
        volume = torch.from_numpy(sitk.GetArrayFromImage(prepared.image))[None, None].float()
        crop = tuple(slice(0, d - d % 16) for d in volume.shape[2:])
        values = sitk.GetArrayFromImage(label).astype(np.int64)[crop]
        labels = torch.from_numpy(lookup[np.clip(values, 0, len(lookup) - 1)])  # label value -> class index, -1: not trained
        with torch.no_grad():
            logits, features = networks["A"](volume[(..., *crop)])
        for name, params in heads.items():
            guess = (logits if params is None else log_posterior(features, params)).argmax(1)[0]
            if guess.shape != labels.shape:
                guess = torch.nn.functional.interpolate(guess[None, None].float(), size=labels.shape)[0, 0].long()
            for c in range(k):
                where = labels == c
                counts[name][c] += [int((guess[where] == c).sum()), int(where.sum())]
    width = max(len(n) for n in names)
    print(f"{'class':<{width}}  voxels  " + "  ".join(f"{n:>18}" for n in heads))
    for c in range(k):
        cells = "  ".join(f"{counts[n][c, 0] / max(counts[n][c, 1], 1):>18.2f}" for n in heads)
        print(f"{names[c]:<{width}}  {int(counts['head'][c, 1]):>6}  {cells}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
