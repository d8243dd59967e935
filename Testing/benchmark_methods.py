"""Benchmark (a script, not a test): supervised-only vs CPS vs GuidedNet with the same budget.

Trains each method over several seeds on one store, segments the store's test cases with each
bundle (network A), and prints per-organ Dice and Jaccard (mean and SD over seeds of the mean
over test cases; only (case, organ) pairs whose reference is annotated), plus seconds per
training step and peak memory, as a Markdown table like the GuidedNet paper's Table 1.

    python Testing/benchmark_methods.py --work runs/bench                       # coarse phantoms
    # issue 8: partial-aware vs plain reading of unannotated organs (":plain" = data.partial_labels=false)
    python Testing/benchmark_methods.py --work runs/kbp100 --openkbp ../shared/data/openkbp-hn-ct \
        --fraction 1 --methods supervised,supervised:plain,guidednet,guidednet:plain --seeds 0
    python Testing/benchmark_methods.py --work runs/bench-kbp --openkbp ../shared/data/openkbp-hn-ct \\
        --fraction 0.1 --spacing 7.8,7.8,5 optim.iterations=2000                # 10% labeled, coarser grid
    # the CPU run of Testing/BENCHMARKS.md: two trainings side by side, one thread each
    python Testing/benchmark_methods.py --work runs/bench --jobs 2 --threads 1 \\
        optim.optimizer=adamw optim.lr=0.003 optim.iterations=250 validation.every=50

    # issue 18: left atrium MRI, 3 named labeled cases, the other training cases unlabeled
    python Testing/benchmark_methods.py --work runs/la10 --dataset ../shared/data/la-mri \
        --labeled-cases la_23X6SY44VT9KFHR7S7OC,la_57SGAJMLCTCH92QUA0EE,la_Q0MEX9ZIKAGJORSPLQ3Y \
        --methods supervised,cps,guidednet,guidednet-paper --csv Testing/results/semisup.csv --plot curves.png

Finished runs (``<work>/<method>-seed<N>/bundle``) are skipped and interrupted ones resumed, so
the same command continues a stopped benchmark; ``--no-train`` reports only what has finished.
Extra ``section.key=value`` arguments go to every training run. A derived store keeps the
references of its unlabeled cases in ``referencesUnlabeled/`` (training never reads them): each
run scores up to 4 of them at every validation (``validation.monitor``) for the curves that
``--plot`` draws, since with few labeled cases every labeled case trains and none validates.
``--csv`` (re)writes the per-case rows of this invocation's runs (``dataset,labeled,method,seed,
case,organ,dice,jaccard,hd95``; HD95 in mm, empty for an empty prediction) into the file, keeping
every row of other runs (other methods, seeds, data sets and label counts). A method is a name
of ``GuidedSegLib.methods.METHODS``, optionally with ``:plain`` and ``@network`` (a ``network.type``), so that one table can tell the
network from the objective: ``--methods cps,guidednet,dkuxnet,guidednet@uxnet-kmax,dkuxnet@unet3d``.
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
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from GuidedSegLib.imageio import read_image
from GuidedSegLib.inference import Predictor
from GuidedSegLib.evaluation import score_organs
from GuidedSegLib.store import CaseStore


def resample(image: sitk.Image, label: sitk.Image | None, spacing) -> tuple[sitk.Image, sitk.Image | None]:
    """``image`` (linear) and ``label`` on a coarser grid of ``spacing`` (x, y, z) mm covering the
    same extent. Each output voxel of the label takes the class with the largest linearly
    interpolated one-hot share (background included), so thin organs are not lost to
    nearest-neighbour sampling."""
    size = [max(1, int(round(n * s / t))) for n, s, t in zip(image.GetSize(), image.GetSpacing(), spacing)]
    origin = image.TransformContinuousIndexToPhysicalPoint([(t / s - 1) / 2 for s, t in zip(image.GetSpacing(), spacing)])
    reference = sitk.Image(size, sitk.sitkUInt8)
    reference.SetSpacing(tuple(float(t) for t in spacing))
    reference.SetOrigin(origin)
    reference.SetDirection(image.GetDirection())
    low = float(sitk.GetArrayViewFromImage(image).min())

    def onto(img, interpolator, default):
        return sitk.Resample(img, reference, sitk.Transform(), interpolator, default, img.GetPixelID())

    coarse = onto(image, sitk.sitkLinear, low)
    if label is None:
        return coarse, None
    values = np.unique(sitk.GetArrayViewFromImage(label))
    shares = []
    for value in values:
        mask = sitk.Cast(sitk.Equal(label, int(value)), sitk.sitkFloat32)
        shares.append(sitk.GetArrayFromImage(onto(mask, sitk.sitkLinear, 1.0 if value == 0 else 0.0)))
    out = sitk.GetImageFromArray(values[np.argmax(np.stack(shares), axis=0)].astype(np.uint8))
    out.CopyInformation(coarse)
    return coarse, out


def thread_env(threads: int) -> dict:
    """This process's environment with the torch/OpenMP threads of a child training capped at
    ``threads`` (0: left as is)."""
    env = dict(os.environ)
    if threads:
        env.update({key: str(threads) for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")})
    return env


def derived_store(source: Path, target: Path, fraction: float, spacing=None, labeled_ids=None) -> Path:
    """A store from a Decathlon set with ``labeled_ids`` labeled (default: ``fraction`` of its
    training cases, chosen by a hash of the case id), the others as unlabeled images (their
    references in ``referencesUnlabeled/``), and its test cases as test.
    ``spacing`` (x, y, z) mm: resample every case onto that coarser grid first (CPU budgets)."""
    if (target / "dataset.json").exists():
        return target
    src = CaseStore(source)
    suffix = f"-{'x'.join(f'{s:g}' for s in spacing)}mm" if spacing else ""
    cases = sorted(src.cases("labeled"), key=lambda c: hashlib.sha1(c.case_id.encode()).hexdigest())
    if labeled_ids:
        unknown = sorted(set(labeled_ids) - {c.case_id for c in cases})
        if unknown:
            raise SystemExit(f"{source}: no labeled training case {', '.join(unknown)}")
        cases = [c for c in cases if c.case_id in labeled_ids] + [c for c in cases if c.case_id not in labeled_ids]
        n_labeled = len(labeled_ids)
    else:
        n_labeled = max(2, round(fraction * len(cases)))
    partial = target.with_name(f".partial-{target.name}")
    shutil.rmtree(partial, ignore_errors=True)
    store = CaseStore.create(partial, src.labels, name=f"{src.name}-{n_labeled}labeled{suffix}", modality=src.modality)

    def files(case, with_label=True):
        if not spacing:
            return case.image, (case.label if with_label else None)
        return resample(read_image(case.image), read_image(case.label) if with_label else None, spacing)

    (partial / "referencesUnlabeled").mkdir()
    for index, case in enumerate(cases):
        image, label = files(case)
        if index < n_labeled:
            store.add_labeled(image, label, case.case_id, annotated=src.annotated_labels(case), source=str(source))
        else:
            store.add_unlabeled(image, case.case_id, source=str(source))
            reference = partial / "referencesUnlabeled" / f"{case.case_id}.nii.gz"
            if isinstance(label, Path):
                shutil.copyfile(label, reference)
            else:
                sitk.WriteImage(label, str(reference), True)
    for case in src.cases("test"):
        image, label = files(case)
        store.add_test(image, label, case.case_id)
    os.replace(partial, target)
    return target


def phantom_store(target: Path) -> Path:
    """Issue 3's coarse phantom store: 4 labeled, 20 unlabeled (references in ``phantomTruth/``), 6 test."""
    if not (target / "dataset.json").exists():
        from GuidedSegLib.phantoms import write_phantom_store

        write_phantom_store(target, cases=24, labeled=4, test=6, seed=11, size=(48, 48, 32), spacing=(8.0, 8.0, 10.0))
    return target


def evaluate(bundle: Path, store: CaseStore) -> dict[int, list[tuple[float, float, str, float]]]:
    """organ value -> [(Dice, Jaccard, case id, HD95 mm (NaN for an empty prediction)) per test
    case where it is annotated]."""
    predictor = Predictor(bundle)
    scores: dict[int, list[tuple[float, float, str, float]]] = {}
    for case in store.cases("test"):
        image = read_image(case.image)
        prediction = sitk.GetArrayFromImage(predictor.segment(image))
        reference_image = read_image(case.label)
        reference = sitk.GetArrayFromImage(reference_image)
        organs = {v: store.labels[v] for v in store.annotated_labels(case) if (reference == v).any()}
        for pair in score_organs(prediction, reference, reference_image.GetSpacing()[::-1], organs, case.case_id):
            scores.setdefault(pair.value, []).append((pair.dice, pair.jaccard, case.case_id, pair.hd95_mm))
    return scores


def write_rows(path: Path, dataset: str, labeled: int, results, store: CaseStore) -> None:
    """Write the per-case rows of ``results`` into ``path``, replacing the rows of the same
    (dataset, labeled, method, seed) runs and keeping every other row: a work folder that holds
    one method's runs must not delete the rows other work folders wrote for the same split."""
    columns = ["dataset", "labeled", "method", "seed", "case", "organ", "dice", "jaccard", "hd95"]
    written = {(dataset, str(labeled), method, str(seed)) for method, seed in results}
    kept = []
    if path.exists():
        with open(path, newline="") as handle:
            kept = [r for r in csv.DictReader(handle)
                    if (r["dataset"], r["labeled"], r["method"], r["seed"]) not in written]
    rows = [{"dataset": dataset, "labeled": labeled, "method": method, "seed": seed, "case": case,
             "organ": store.labels[organ], "dice": f"{d:.6f}", "jaccard": f"{j:.6f}",
             "hd95": "" if not hd95 or np.isnan(hd95[0]) else f"{hd95[0]:.3f}"}
            for (method, seed), (scores, _) in results.items() for organ, values in sorted(scores.items())
            for d, j, case, *hd95 in values]  # scores cached before HD95 was added have none
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(kept + rows)
    os.replace(tmp, path)


def plot_curves(path: Path, work: Path, runs, title: str) -> None:
    """Validation (or monitor) mean Dice against iteration for every run, one panel per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(m for m, _ in runs))
    figure, axes = plt.subplots(1, len(methods), figsize=(4 * len(methods), 3.2), sharey=True, squeeze=False)
    for axis, method in zip(axes[0], methods):
        for m, seed in runs:
            if m != method:
                continue
            for name, style in (("validation.csv", "-"), ("monitor_validation.csv", "--")):
                file = run_folder(work, m, seed) / name
                if file.exists():
                    with open(file, newline="") as handle:
                        rows = list(csv.DictReader(handle))
                    if rows:
                        axis.plot([int(r["iteration"]) for r in rows], [float(r["mean_dice"]) for r in rows], style,
                                  label=f"seed {seed} ({'validation' if name == 'validation.csv' else 'monitor'})")
        axis.set_title(method)
        axis.set_xlabel("iteration")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    axes[0][0].set_ylabel("mean Dice")
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--dataset", "--openkbp", dest="dataset", type=Path,
                        help="a Decathlon set to derive the store from (default: coarse phantoms)")
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--labeled-cases", help="comma-separated case ids to label (instead of --fraction)")
    parser.add_argument("--csv", type=Path, help="per-case rows of every finished run go into this file")
    parser.add_argument("--plot", type=Path, help="PNG of validation / monitor Dice against iteration per run")
    parser.add_argument("--spacing", help="x,y,z mm: resample the derived store onto this coarser grid")
    parser.add_argument("--methods", default="supervised,cps,guidednet")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--jobs", type=int, default=1, help="trainings run side by side")
    parser.add_argument("--threads", type=int, default=0, help="torch/OpenMP threads per training (0: leave as is)")
    parser.add_argument("--report", type=Path, help="also write the Markdown table here")
    parser.add_argument("--no-train", action="store_true", help="only report the runs that have finished")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    spacing = tuple(float(v) for v in args.spacing.split(",")) if args.spacing else None
    labeled_ids = args.labeled_cases.split(",") if args.labeled_cases else None
    root = (derived_store(args.dataset, args.work / "store", args.fraction, spacing, labeled_ids) if args.dataset
            else phantom_store(args.work / "store"))
    store = CaseStore(root)
    dataset = args.dataset.resolve().name if args.dataset else "phantoms"
    truth = "referencesUnlabeled" if args.dataset else "phantomTruth"
    env = thread_env(args.threads)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods, seeds = args.methods.split(","), [int(s) for s in args.seeds.split(",")]
    from GuidedSegLib.methods import METHODS

    from GuidedSegLib.networks import ARCHITECTURES

    for method in methods:
        name, plain, network = parse_method(method)
        if name not in METHODS or (network is not None and network not in ARCHITECTURES) or \
                method.count(":") > 1 or (":" in method and not plain):
            parser.error(f"--methods: {method!r} is not one of {', '.join(METHODS)}, optionally with ':plain' and "
                         f"'@network' ({', '.join(ARCHITECTURES)})")
    # Seed by seed, so that whatever finishes first is a set of complete comparisons.
    runs = [(m, s) for s in seeds for m in methods]
    pending = [] if args.no_train else [
        (m, s) for m, s in runs if not (run_folder(args.work, m, s) / "bundle" / "model.json").exists()]
    running: dict = {}
    failed = []
    while pending or running:
        while pending and len(running) < max(1, args.jobs):
            method, seed = pending.pop(0)
            out = run_folder(args.work, method, seed)
            out.mkdir(parents=True, exist_ok=True)
            name, plain, network = parse_method(method)
            extra = (["data.partial_labels=false"] if plain else []) + ([f"network.type={network}"] if network else [])
            command = [sys.executable, str(ROOT / "Training" / "train.py"), "--store", str(root), "--output",
                       str(out), "--method", name, "--seed", str(seed), "--progress", "none",
                       f"data.cache={args.work / 'cache'}", f"validation.monitor={truth}", *args.overrides, *extra]
            if (out / "checkpoint.pt").exists():
                command.append("--resume")
            log = open(out / "train.log", "a")
            print(f"{time.strftime('%H:%M:%S')} start {method} seed {seed}: {' '.join(command)}", flush=True)
            running[(method, seed)] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env),
                                       time.monotonic(), log)
        time.sleep(2)
        for key, (process, began, log) in list(running.items()):
            if process.poll() is None:
                continue
            log.close()
            del running[key]
            state = "trained" if process.returncode == 0 else f"FAILED (exit {process.returncode})"
            if process.returncode:
                failed.append(key)
            print(f"{time.strftime('%H:%M:%S')} {key[0]} seed {key[1]}: {state} in {time.monotonic() - began:.0f} s",
                  flush=True)
    results = {}
    for method, seed in runs:
        out = run_folder(args.work, method, seed)
        if not (out / "bundle" / "model.json").exists():
            continue
        model = json.loads((out / "bundle" / "model.json").read_text())
        cached = out / "test-scores-by-case.json"
        if cached.exists():
            scores = {int(k): [tuple(x) for x in v] for k, v in json.loads(cached.read_text()).items()}
        else:
            scores = evaluate(out / "bundle", store)
            cached.write_text(json.dumps({str(k): v for k, v in scores.items()}))
        results[(method, seed)] = (scores, model["training"])
    if not results:
        print("no finished run to report", flush=True)
        return 1
    if args.csv:
        write_rows(args.csv, dataset, len(store.cases("labeled")), results, store)
    if args.plot:
        plot_curves(args.plot, args.work, list(results), f"{dataset}, {len(store.cases('labeled'))} labeled")
    table = report(results, store)
    if failed:
        table += "\n\nfailed: " + ", ".join(f"{m} seed {s}" for m, s in failed)
    print(table)
    if args.report:
        args.report.write_text(table + "\n")
    return 1 if failed else 0


def parse_method(spec: str) -> tuple[str, bool, str | None]:
    """``guidednet:plain@uxnet-kmax`` -> (method, partial labels off, network.type or None)."""
    spec, _, network = spec.partition("@")
    name, _, suffix = spec.partition(":")
    return name, suffix == "plain", network or None


def run_folder(work: Path, method: str, seed: int) -> Path:
    """``supervised-seed0``; ``supervised:plain`` (partial labels off) -> ``supervised-plain-seed0``;
    ``guidednet@uxnet-kmax`` -> ``guidednet-uxnet-kmax-seed0``."""
    return work / f"{method.replace(':', '-').replace('@', '-')}-seed{seed}"


def report(results, store: CaseStore) -> str:
    """Mean ± SD in %: over seeds of each seed's mean over test cases, or, when every method ran
    one seed, over the test cases themselves (the header says which)."""
    methods = list(dict.fromkeys(m for m, _ in results))
    organs = sorted({v for scores, _ in results.values() for v in scores})
    one_seed = all(sum(1 for k in results if k[0] == m) == 1 for m in methods)
    spread = "SD over test cases" if one_seed else "SD over seeds"
    lines = [f"| organ (n test cases; {spread}) | " + " | ".join(f"{m} Dice | {m} Jaccard | {m} HD95 mm"
                                                                  for m in methods) + " |",
             "|---|" + "---|---|---|" * len(methods)]
    means = {m: [] for m in methods}
    for organ in organs:
        cells = []
        n = max(len(results[key][0].get(organ, [])) for key in results)
        for m in methods:
            keys = [key for key in results if key[0] == m and organ in results[key][0]]
            values = ([v[:2] for v in results[keys[0]][0][organ]] if one_seed else
                      [np.mean([v[:2] for v in results[k][0][organ]], axis=0) for k in keys])
            d, j = np.array(values).T * 100
            hd = hd95_values(results, keys, organ, one_seed)
            hd_cell = f"{np.mean(hd):.1f} ± {np.std(hd):.1f}" if len(hd) else "-"
            cells.append(f"{d.mean():.1f} ± {d.std():.1f} | {j.mean():.1f} ± {j.std():.1f} | {hd_cell}")
        lines.append(f"| {store.labels[organ]} ({n}) | " + " | ".join(cells) + " |")
    for m in methods:
        seeds = [key for key in results if key[0] == m]
        per_seed = [np.mean([np.mean([v[:2] for v in results[k][0][o]], axis=0) for o in results[k][0]], axis=0) * 100
                    for k in seeds]
        means[m] = np.array(per_seed)
    if one_seed:  # an SD over one seed would read as a spread of zero
        lines.append("| **mean of organs** | " + " | ".join(f"**{means[m][0, 0]:.1f}** | **{means[m][0, 1]:.1f}** | "
                                                         for m in methods) + " |")
    else:
        lines.append("| **mean** | " + " | ".join(f"**{means[m][:, 0].mean():.1f} ± {means[m][:, 0].std():.1f}** | "
                                                f"**{means[m][:, 1].mean():.1f} ± {means[m][:, 1].std():.1f}** | "
                                                for m in methods) + " |")
    lines.append("")
    lines.append("HD95: over the (case, organ) pairs with a non-empty prediction.")
    lines.append("")
    lines.append("| method | seconds / step | peak memory (MB) | seeds |")
    lines.append("|---|---|---|---|")
    for m in methods:
        t = [results[k][1] for k in results if k[0] == m]
        lines.append(f"| {m} | {np.mean([x['seconds_per_iteration'] for x in t]):.3f} | "
                     f"{max(x['peak_memory_mb'] for x in t):.0f} | {len(t)} |")
    return "\n".join(lines)


def hd95_values(results, keys, organ: int, one_seed: bool) -> list[float]:
    """HD95 (mm) of ``organ``: per test case (one seed) or each seed's mean over its cases; NaNs
    (empty predictions) and scores cached before HD95 was recorded are left out."""
    per_key = [[v[3] for v in results[k][0][organ] if len(v) > 3 and not np.isnan(v[3])] for k in keys]
    if one_seed:
        return per_key[0]
    return [float(np.mean(v)) for v in per_key if v]


if __name__ == "__main__":
    sys.exit(main())
