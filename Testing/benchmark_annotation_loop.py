"""Benchmark (a script, not a test): the annotation loop with a simulated annotator.

The pool is a Decathlon set's training cases (its test split stays untouched); the loop starts
with ``--start`` of them labeled. Each round, for every arm (strategy x method x seed):

1. rank the arm's unlabeled pool with the previous round's bundle (``guidedseg suggest``'s
   library call: ``disagreement`` or ``random``);
2. "correct" the top ``--k``: the previous bundle's draft is compared with the reference (the
   correction effort: voxels that differ, and the share of axial slices with a difference), and
   the reference is ingested as the case's label through ``CaseStore.ingest_label``, the call the
   panel's Export makes, with provenance ``simulated annotator (benchmark_annotation_loop)``;
3. train: ``warm`` fine-tunes from the previous bundle (``train.py --init-from``) with the fixed
   budget ``--round-iterations``. At the rounds in ``--scratch-rounds``, a ``scratch`` model is
   also trained anew, with ``--iterations``, on the same labeled cases: the warm start and the
   from-scratch training then differ only in how they start;
4. score the new bundles on the test cases (Dice per case and organ).

Rows go to ``--csv`` (default Testing/results/annotation-loop.csv), one per (dataset, strategy,
method, start, round, labeled, seed, case, organ): test cases carry ``dice``; the cases corrected
in the round carry ``effort_voxels`` (organ ``all``) and ``slices_touched`` (an extra column);
``wall_s`` is the round's wall time for that start (ranking + drafts + its training) and
``train_s`` the training's alone (an extra column). The file is rewritten
atomically after every round, keeping the rows of other datasets. Finished rounds (a
``done.json`` in their folder) are skipped, an interrupted training resumes, so the same command
continues a stopped run. PNGs: mean test Dice against labeled cases, and effort against round.

    # smoke run on coarse phantoms (minutes)
    python Testing/benchmark_annotation_loop.py --work runs/loop-smoke --rounds 2 --k 1 \\
        --iterations 20 --round-iterations 10 --csv runs/loop-smoke/annotation-loop.csv
    # the real runs: see Testing/BENCHMARKS.md, "Issue 20"
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "Testing"))

from benchmark_methods import derived_store, evaluate, thread_env  # noqa: E402

from GuidedSegLib.imageio import atomic_path, read_image  # noqa: E402
from GuidedSegLib.store import CaseStore  # noqa: E402

COLUMNS = ["dataset", "strategy", "method", "start", "round", "labeled", "seed", "case", "organ", "dice",
           "effort_voxels", "wall_s", "slices_touched", "train_s"]
SOURCE = "simulated annotator (benchmark_annotation_loop)"
_CSV_LOCK = threading.Lock()


def base_store(args) -> tuple[Path, str, str]:
    """(store with ``--start`` labeled cases, dataset name, folder of the pool's references)."""
    target = args.work / "base-store"
    if args.dataset is None:
        if not (target / "dataset.json").exists():
            from GuidedSegLib.phantoms import write_phantom_store

            partial = target.with_name(".partial-base-store")
            shutil.rmtree(partial, ignore_errors=True)
            write_phantom_store(partial, cases=args.pool + args.start, labeled=args.start, test=args.test, seed=21,
                                size=(48, 48, 32), spacing=(8.0, 8.0, 10.0))
            os.replace(partial, target)
        return target, "phantoms", "phantomTruth"
    source = CaseStore(args.dataset)
    ordered = sorted(source.cases("labeled"), key=lambda c: hashlib.sha1(c.case_id.encode()).hexdigest())
    spacing = tuple(float(v) for v in args.spacing.split(",")) if args.spacing else None
    derived_store(args.dataset, target, 0.0, spacing, [c.case_id for c in ordered[:args.start]])
    return target, args.dataset.resolve().name, "referencesUnlabeled"


def train(args, store: Path, output: Path, method: str, seed: int, parent: Path | None, iterations: int,
          threads: int = 0) -> float:
    """Train (or fine-tune from ``parent``) into ``output``; resumes a stopped run. The training's
    wall seconds, summed over its resumptions (kept in ``output/train_seconds.json``). ``threads``
    (0: leave as is) caps the training's torch/OpenMP threads."""
    record = output / "train_seconds.json"
    spent = json.loads(record.read_text())["seconds"] if record.exists() else 0.0
    if (output / "bundle" / "model.json").exists():
        return spent
    command = [sys.executable, str(ROOT / "Training" / "train.py"), "--store", str(store), "--output", str(output),
               "--method", method, "--seed", str(seed), "--progress", "none", f"optim.iterations={iterations}",
               f"data.cache={args.work / 'cache'}",
               # every labeled case trains in every round: otherwise, from the 10th labeled case on, the
               # store's split would hold some out for validation and the rounds would not compare
               "validation.fraction=0", *args.overrides]
    if parent is not None:
        command[2:2] = ["--init-from", str(parent)]
        command.append(f"validation.every={max(1, iterations // 2)}")
    if (output / "checkpoint.pt").exists():
        command.append("--resume")
    output.mkdir(parents=True, exist_ok=True)
    env = thread_env(threads)
    began = time.monotonic()
    with open(output.parent / f"{output.name}.log", "a") as log:
        print(f"{time.strftime('%H:%M:%S')} {' '.join(command)}", flush=True)
        code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    spent += time.monotonic() - began
    _write_json(record, {"seconds": spent})
    if code:
        raise SystemExit(f"training failed (exit {code}); see {output.parent / f'{output.name}.log'}")
    return spent


def effort(draft: np.ndarray, reference: np.ndarray) -> tuple[int, float]:
    """Voxels the annotator changes (draft -> reference), and the share of axial slices touched."""
    changed = draft != reference
    return int(changed.sum()), float(changed.any(axis=(1, 2)).mean())


def dice_rows(bundle: Path, store: CaseStore, common: dict) -> list[dict]:
    scores = evaluate(bundle, store)
    return [{**common, "case": case, "organ": store.labels[organ], "dice": f"{d:.6f}"}
            for organ, values in sorted(scores.items()) for d, _, case, *_ in values]


def first_round(args, base: Path, dataset: str, method: str, seed: int) -> Path:
    """Round 0, the model on the ``--start`` labeled cases, shared by every arm of this method and
    seed (trained with every arm's threads, before the arms start); its bundle."""
    first = args.work / f"round0-{method}-seed{seed}"
    bundle = first / "run" / "bundle"
    if not (first / "done.json").exists():
        seconds = train(args, base, first / "run", method, seed, None, args.iterations, args.threads * args.jobs)
        common = {"dataset": dataset, "strategy": "", "method": method, "seed": seed, "round": 0,
                  "labeled": args.start, "wall_s": f"{seconds:.1f}", "train_s": f"{seconds:.1f}"}
        _write_json(first / "done.json", {"rows": dice_rows(bundle, CaseStore(base), common), "wall_s": seconds})
    return bundle


def run_arm(args, base: Path, dataset: str, truth: str, strategy: str, method: str, seed: int) -> None:
    """Every round of one arm after round 0, skipping those with a done.json."""
    from GuidedSegLib.inference import Predictor
    from GuidedSegLib.suggest import suggest

    arm = args.work / f"{strategy}-{method}-seed{seed}"
    store_root = arm / "store"
    if not (store_root / "dataset.json").exists():
        shutil.copytree(base, arm / ".partial-store", dirs_exist_ok=True)
        os.replace(arm / ".partial-store", store_root)
    common = {"dataset": dataset, "strategy": strategy, "method": method, "seed": seed}
    bundle = first_round(args, base, dataset, method, seed)
    for r in range(1, args.rounds + 1):
        folder = arm / f"round{r}"
        previous = bundle
        bundle = folder / "run" / "bundle"
        if (folder / "done.json").exists():
            continue
        began = time.monotonic()
        store = CaseStore(store_root)
        selection_file = folder / "selection.json"
        if selection_file.exists():  # ranked (and perhaps partly ingested) before an interruption
            selection = json.loads(selection_file.read_text())
        else:
            if not store.cases("unlabeled"):
                print(f"{arm.name}: the pool is used up after round {r - 1}", flush=True)
                break
            ranking = suggest(previous, store_root, strategy, seed=seed * 1000 + r)
            chosen = [s.case_id for s in ranking.items[:args.k]]
            predictor = Predictor(previous)
            selection = []
            for case_id in chosen:
                image = read_image(store.case(case_id).image)
                draft = sitk.GetArrayFromImage(predictor.segment(image))
                reference = sitk.GetArrayFromImage(read_image(store.root / truth / f"{case_id}.nii.gz"))
                voxels, slices = effort(draft, reference)
                selection.append({"case": case_id, "effort_voxels": voxels, "slices_touched": slices})
            _write_json(selection_file, selection)
        for item in selection:
            if store.case(item["case"]).kind == "unlabeled":
                store.ingest_label(item["case"], store.root / truth / f"{item['case']}.nii.gz", source=SOURCE,
                                   model=str(previous))
        labeled = len(CaseStore(store_root).cases("labeled"))
        selecting = _selection_seconds(folder, time.monotonic() - began)
        # the round is done only once every training of it is: the next round changes the store
        trainings = [("warm", folder / "run", previous, args.round_iterations)]
        if r in args.scratch_rounds:
            trainings.append(("scratch", folder / "scratch-run", None, args.iterations))
        rows = []
        for start, output, parent, iterations in trainings:
            seconds = train(args, store_root, output, method, seed, parent, iterations, args.threads)
            start_common = {**common, "start": start, "round": r, "labeled": labeled,
                            "wall_s": f"{selecting + seconds:.1f}", "train_s": f"{seconds:.1f}"}
            rows += dice_rows(output / "bundle", CaseStore(store_root), start_common)
            rows += [{**start_common, "case": item["case"], "organ": "all", "effort_voxels": item["effort_voxels"],
                      "slices_touched": f"{item['slices_touched']:.4f}"} for item in selection]
        _write_json(folder / "done.json", {"rows": rows})
        print(f"{time.strftime('%H:%M:%S')} {arm.name} round {r}: {labeled} labeled, "
              f"{time.monotonic() - began:.0f} s", flush=True)
        write_csv(args, dataset)


def _selection_seconds(folder: Path, seconds: float) -> float:
    """The round's ranking + drafts + ingest time, kept from its first pass (a resumed round
    ranks nothing again)."""
    record = folder / "selection_seconds.json"
    if record.exists():
        return json.loads(record.read_text())["seconds"]
    _write_json(record, {"seconds": seconds})
    return seconds


def _write_json(path: Path, data) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1))


def collected_rows(args) -> list[dict]:
    rows = []
    for done in sorted(args.work.glob("round0-*/done.json")) + sorted(args.work.glob("*-seed*/round*/done.json")):
        arm = done.parent.parent.name if done.parent.name.startswith("round") and done.parent.parent != args.work \
            else None
        for row in json.loads(done.read_text())["rows"]:
            if arm is None:  # round 0 belongs to every arm of its method and seed, and to both starts
                for strategy in args.strategies.split(","):
                    for start in ("warm", "scratch") if args.scratch_rounds else ("warm",):
                        if row["method"] in args.methods.split(","):
                            rows.append({**row, "strategy": strategy, "start": start})
            else:
                rows.append(row)
    unique = {tuple(str(r.get(c, "")) for c in COLUMNS): r for r in rows}
    return list(unique.values())


def csv_rows(args, dataset: str | None = None) -> list[dict]:
    """The rows already in ``--csv`` (of one dataset, if given)."""
    if not args.csv.exists():
        return []
    with open(args.csv, newline="") as handle:
        return [r for r in csv.DictReader(handle) if dataset is None or r["dataset"] == dataset]


def write_csv(args, dataset: str) -> None:
    """This run's rows (this dataset, this run's methods and seeds) from every finished round; every
    other row of the file is kept, so runs of other datasets, methods or seeds, from other work
    folders, add up."""
    methods, seeds = args.methods.split(","), args.seeds.split(",")
    with _CSV_LOCK:
        kept = [r for r in csv_rows(args)
                if r["dataset"] != dataset or r["method"] not in methods or str(r["seed"]) not in seeds]
        rows = [r for r in collected_rows(args)
                if r["dataset"] == dataset and r["method"] in methods and str(r["seed"]) in seeds]
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(args.csv) as tmp, open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(kept + rows)


def plot(args, dataset: str) -> list[Path]:
    """Mean test Dice against labeled cases, and mean effort against round, one line per arm of
    every method in ``--csv`` for this dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = csv_rows(args, dataset)
    arms = sorted({(r["strategy"], r["method"], r["start"], r["seed"]) for r in rows})
    out = []
    for name, x_key, value, ylabel in (("dice", "labeled", "dice", "mean test Dice"),
                                        ("effort", "round", "effort_voxels", "voxels corrected per case")):
        figure, axis = plt.subplots(figsize=(5.5, 3.6))
        for arm in arms:
            points = {}
            for r in rows:
                if (r["strategy"], r["method"], r["start"], r["seed"]) == arm and str(r.get(value, "")) != "":
                    points.setdefault(int(r[x_key]), []).append(r)
            if points:
                xs = sorted(points)
                # Dice as the report and the issue score it (organs weigh alike, whatever their
                # number of annotated test cases); effort per corrected case
                ys = [mean_dice(points[x]) if value == "dice" else np.mean([float(r[value]) for r in points[x]])
                      for x in xs]
                axis.plot(xs, ys, "o-", label=" / ".join(map(str, arm)))
        axis.set_xlabel("labeled cases" if x_key == "labeled" else "round")
        axis.set_ylabel(ylabel)
        axis.set_title(f"{dataset}: annotation loop")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=6)
        figure.tight_layout()
        path = args.plots / f"annotation-loop-{dataset}-{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=110)
        plt.close(figure)
        out.append(path)
    return out


def mean_dice(rows: list[dict]) -> float:
    """Mean over organs of the mean over test cases."""
    by_organ: dict[str, list[float]] = {}
    for r in rows:
        if str(r.get("dice", "")) != "":
            by_organ.setdefault(r["organ"], []).append(float(r["dice"]))
    return float(np.mean([np.mean(v) for v in by_organ.values()])) if by_organ else float("nan")


def labeled_to_reach(curve: dict[int, float], target: float) -> float | None:
    """The labeled count at which ``curve`` (labeled -> Dice) first reaches ``target``, linearly
    interpolated between rounds; None if it never does."""
    points = sorted(curve.items())
    for (x0, y0), (x1, y1) in zip([points[0]] + points, points):
        if y1 >= target:
            return float(x1) if y1 == y0 or x1 == x0 else x0 + (target - y0) / (y1 - y0) * (x1 - x0)
    return None


def report(args, dataset: str) -> str:
    """The issue's two questions, answered from the rows: does disagreement reach random's final
    Dice with at least 30 % fewer labeled cases, and does a warm start reach the from-scratch Dice
    in a third of the time or less (every method in ``--csv`` for this dataset)."""
    rows = csv_rows(args, dataset)
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["seed"], r["strategy"], r["start"], int(r["round"]), int(r["labeled"])),
                          []).append(r)
    dice = {key: mean_dice(group) for key, group in groups.items()}
    train_s = {key: float(group[0]["train_s"]) for key, group in groups.items() if group[0].get("train_s")}
    lines = [f"### {dataset}", "", "| method | seed | strategy | start | round | labeled | mean test Dice | train s |",
             "|---|---|---|---|---|---|---|---|"]
    for key in sorted(dice):
        method, seed, strategy, start, rnd, labeled = key
        lines.append(f"| {method} | {seed} | {strategy} | {start} | {rnd} | {labeled} | {100 * dice[key]:.1f} | "
                     f"{train_s.get(key, float('nan')):.0f} |")
    lines.append("")
    for method, seed in sorted({(k[0], k[1]) for k in dice}):
        curves = {strategy: {k[5]: v for k, v in dice.items() if k[:4] == (method, seed, strategy, "warm")}
                  for strategy in args.strategies.split(",")}
        baseline = curves.get("random")
        for strategy, curve in curves.items():
            if strategy == "random" or not curve or not baseline:
                continue
            final_labeled = max(baseline)
            target = baseline[final_labeled]
            reached = labeled_to_reach(curve, target)
            saving = None if reached is None else 1 - reached / final_labeled
            verdict = ("never reached" if reached is None else
                       f"reached at {reached:.1f} labeled, {100 * saving:.0f} % fewer: "
                       f"{'yes' if saving >= 0.3 else 'no'}")
            lines.append(f"- {method} seed {seed}, {strategy} against random's final Dice "
                         f"({100 * target:.1f} at {final_labeled} labeled): {verdict}")
        for k, value in sorted(dice.items()):
            if k[:2] != (method, seed) or k[3] != "scratch" or k[4] == 0:
                continue
            warm = (method, seed, k[2], "warm", k[4], k[5])
            if warm not in dice or warm not in train_s or k not in train_s:
                continue
            ratio = train_s[warm] / train_s[k]
            holds = dice[warm] >= value and ratio <= 1 / 3
            lines.append(f"- {method} seed {seed}, {k[2]}, round {k[4]} ({k[5]} labeled): warm {100 * dice[warm]:.1f} "
                         f"in {train_s[warm]:.0f} s against scratch {100 * value:.1f} in {train_s[k]:.0f} s "
                         f"(time ratio {ratio:.2f}): {'yes' if holds else 'no'}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="section.key=value settings for every training run")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--dataset", type=Path, help="a Decathlon set (default: coarse phantoms)")
    parser.add_argument("--spacing", help="x,y,z mm: resample the derived store onto this coarser grid")
    parser.add_argument("--start", type=int, default=2, help="labeled cases at round 0 (default 2)")
    parser.add_argument("--pool", type=int, default=8, help="phantoms only: unlabeled pool size (default 8)")
    parser.add_argument("--test", type=int, default=3, help="phantoms only: test cases (default 3)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--k", type=int, default=2, help="cases corrected per round (default 2)")
    parser.add_argument("--iterations", type=int, default=1000, help="from-scratch budget (round 0 and 'scratch')")
    parser.add_argument("--round-iterations", type=int, default=300, help="fine-tune budget of a 'warm' round")
    parser.add_argument("--strategies", default="disagreement,random")
    parser.add_argument("--methods", default="guidednet,supervised")
    parser.add_argument("--scratch-rounds", default="",
                        help="rounds (comma-separated, or 'all') at which a model is also trained from scratch on "
                             "the warm arm's labeled cases (default: none)")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--jobs", type=int, default=1,
                        help="arms run at once after their round 0 (round 0 trains alone, with jobs x threads)")
    parser.add_argument("--threads", type=int, default=0, help="torch/OpenMP threads per training (0: leave as is)")
    parser.add_argument("--csv", type=Path, default=ROOT / "Testing" / "results" / "annotation-loop.csv")
    parser.add_argument("--plots", type=Path, help="folder of the PNGs (default: beside the CSV)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    args.plots = args.plots or args.csv.parent
    args.scratch_rounds = (set(range(1, args.rounds + 1)) if args.scratch_rounds == "all"
                           else {int(r) for r in args.scratch_rounds.split(",") if r})
    if args.jobs > 1 and not args.threads:
        parser.error("--jobs needs --threads, so that the arms running at once do not oversubscribe the cores")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)  # the in-process ranking and drafts
    base, dataset, truth = base_store(args)
    began = time.monotonic()
    seeds, methods = [int(s) for s in args.seeds.split(",")], args.methods.split(",")
    for seed in seeds:
        for method in methods:
            first_round(args, base, dataset, method, seed)
    arms = [(strategy, method, seed) for seed in seeds for method in methods for strategy in args.strategies.split(",")]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for done in [pool.submit(run_arm, args, base, dataset, truth, *arm) for arm in arms]:
            done.result()
    write_csv(args, dataset)
    for path in plot(args, dataset):
        print(f"plot: {path}")
    print(report(args, dataset))
    print(f"rows: {args.csv}; {time.monotonic() - began:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
