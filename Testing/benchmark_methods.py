"""Benchmark (a script, not a test): supervised-only vs CPS vs GuidedNet with the same budget.

Trains each method over several seeds on one store, segments the store's test cases with each
bundle (network A), and prints per-organ Dice and Jaccard (mean and SD over seeds of the mean
over test cases; only (case, organ) pairs whose reference is annotated), plus seconds per
training step and peak memory, as a Markdown table like the GuidedNet paper's Table 1.

    python Testing/benchmark_methods.py --work runs/bench                       # coarse phantoms
    python Testing/benchmark_methods.py --work runs/bench-kbp --openkbp ../shared/data/openkbp-hn-ct \\
        --fraction 0.1 optim.iterations=2000                                   # 10% labeled
Extra ``section.key=value`` arguments go to every training run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from GuidedSegLib.imageio import read_image
from GuidedSegLib.inference import Predictor
from GuidedSegLib.metrics import dice, jaccard
from GuidedSegLib.store import CaseStore


def openkbp_store(source: Path, target: Path, fraction: float) -> Path:
    """A store from a Decathlon set with ``fraction`` of its training cases labeled (chosen by a
    hash of the case id), the others as unlabeled images, and its test cases as test."""
    if (target / "dataset.json").exists():
        return target
    src = CaseStore(source)
    store = CaseStore.create(target, src.labels, name=f"{src.name}-{int(fraction * 100)}pct", modality=src.modality)
    cases = sorted(src.cases("labeled"), key=lambda c: hashlib.sha1(c.case_id.encode()).hexdigest())
    n_labeled = max(2, round(fraction * len(cases)))
    for index, case in enumerate(cases):
        if index < n_labeled:
            store.add_labeled(case.image, case.label, case.case_id, source=str(source))
        else:
            store.add_unlabeled(case.image, case.case_id, source=str(source))
    for case in src.cases("test"):
        store.add_test(case.image, case.label, case.case_id)
    return target


def phantom_store(target: Path) -> Path:
    if not (target / "dataset.json").exists():
        from GuidedSegLib.phantoms import write_phantom_store

        write_phantom_store(target, cases=24, labeled=4, test=6, seed=11, size=(48, 48, 32), spacing=(8.0, 8.0, 10.0))
    return target


def evaluate(bundle: Path, store: CaseStore) -> dict[int, list[tuple[float, float]]]:
    """organ value -> [(Dice, Jaccard) per test case where it is annotated]."""
    predictor = Predictor(bundle)
    scores: dict[int, list[tuple[float, float]]] = {}
    for case in store.cases("test"):
        prediction = sitk.GetArrayFromImage(predictor.segment(read_image(case.image)))
        reference = sitk.GetArrayFromImage(read_image(case.label))
        for value in store.annotated_labels(case):
            p, r = prediction == value, reference == value
            if r.any():
                scores.setdefault(value, []).append((dice(p, r), jaccard(p, r)))
    return scores


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--openkbp", type=Path, help="a Decathlon set to derive the store from")
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--methods", default="supervised,cps,guidednet")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--report", type=Path, help="also write the Markdown table here")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    root = openkbp_store(args.openkbp, args.work / "store", args.fraction) if args.openkbp else phantom_store(args.work / "store")
    store = CaseStore(root)
    results = {}
    for method in args.methods.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            out = args.work / f"{method}-seed{seed}"
            if not (out / "bundle" / "model.json").exists():
                began = time.monotonic()
                command = [sys.executable, str(ROOT / "Training" / "train.py"), "--store", str(root), "--output",
                           str(out), "--method", method, "--seed", str(seed), "--progress", "none",
                           f"data.cache={args.work / 'cache'}", *args.overrides]
                if (out / "checkpoint.pt").exists():
                    command.append("--resume")
                subprocess.run(command, check=True)
                print(f"{method} seed {seed}: trained in {time.monotonic() - began:.0f} s", flush=True)
            model = json.loads((out / "bundle" / "model.json").read_text())
            results[(method, seed)] = (evaluate(out / "bundle", store), model["training"])
    table = report(results, store)
    print(table)
    if args.report:
        args.report.write_text(table + "\n")
    return 0


def report(results, store: CaseStore) -> str:
    methods = list(dict.fromkeys(m for m, _ in results))
    organs = sorted({v for scores, _ in results.values() for v in scores})
    lines = ["| organ (n test cases) | " + " | ".join(f"{m} Dice | {m} Jaccard" for m in methods) + " |",
             "|---|" + "---|---|" * len(methods)]
    means = {m: [] for m in methods}
    for organ in organs:
        cells = []
        n = max(len(results[key][0].get(organ, [])) for key in results)
        for m in methods:
            per_seed = [np.mean(results[key][0][organ], axis=0) for key in results if key[0] == m and organ in results[key][0]]
            d, j = np.array(per_seed).T * 100
            cells.append(f"{d.mean():.1f} ± {d.std():.1f} | {j.mean():.1f} ± {j.std():.1f}")
        lines.append(f"| {store.labels[organ]} ({n}) | " + " | ".join(cells) + " |")
    for m in methods:
        seeds = [key for key in results if key[0] == m]
        per_seed = [np.mean([np.mean(results[k][0][o], axis=0) for o in results[k][0]], axis=0) * 100 for k in seeds]
        means[m] = np.array(per_seed)
    lines.append("| **mean** | " + " | ".join(f"**{means[m][:, 0].mean():.1f} ± {means[m][:, 0].std():.1f}** | "
                                            f"**{means[m][:, 1].mean():.1f} ± {means[m][:, 1].std():.1f}**" for m in methods) + " |")
    lines.append("")
    lines.append("| method | seconds / step | peak memory (MB) | seeds |")
    lines.append("|---|---|---|---|")
    for m in methods:
        t = [results[k][1] for k in results if k[0] == m]
        lines.append(f"| {m} | {np.mean([x['seconds_per_iteration'] for x in t]):.3f} | "
                     f"{max(x['peak_memory_mb'] for x in t):.0f} | {len(t)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
