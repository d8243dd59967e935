"""The training loop behind ``Training/train.py``: store in, model bundle out.

Steps: open the store and check it; plan preprocessing (or take a preset); preprocess every case
once into the cache; draw crops per iteration; step SGD with a poly schedule; validate with a
sliding window on the validation split and keep the best weights; write a bundle.

Crash safety: the checkpoint (networks, optimiser, KT-CPS weights, iteration, best score) is
written atomically every ``checkpoint_every`` iterations and on Ctrl-C / SIGTERM. The crops and
the dropout masks of iteration i depend only on (seed, i, rank), so ``--resume`` continues with
exactly the steps an uninterrupted run takes (bit for bit on CPU).
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import math
import os
import signal
import time
from pathlib import Path

import numpy as np
import torch
import yaml

import GuidedSegLib
from GuidedSegLib import distributed as dist_utils
from GuidedSegLib.bundle import write_bundle
from GuidedSegLib.devices import DeviceError, cpu_has_native_bf16, resolve_device
from GuidedSegLib.errors import GuidedSegError
from GuidedSegLib.imageio import atomic_path
from GuidedSegLib.inference import count_windows
from GuidedSegLib.labels import label_colour, mirror_permutation
from GuidedSegLib.lineage import label_mismatch, lineage_metadata, training_cases
from GuidedSegLib.methods import Batch, build_method
from GuidedSegLib.metrics import per_class_dice, summarise
from GuidedSegLib.preprocessing import PRESETS, PreprocessingPlan, plan_from_dataset
from GuidedSegLib.progress import Reporter as ProgressReporter
from GuidedSegLib.store import CaseStore
from GuidedSegLib.training_data import Augmentation, CropSampler, IterationBatches, TrainingData

from .config import SMALL_STORE, ConfigError, TrainConfig

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
MAX_SKIPPED_IN_A_ROW = 20
PLANNING_CASES = 30


class TrainingSetupError(GuidedSegError, ValueError):
    """The store or the configuration cannot be trained on; raised before training starts."""


@dataclasses.dataclass
class Result:
    status: str  # "finished" or "stopped"
    iteration: int
    bundle: Path | None
    validation: dict | None
    signal: int | None = None


class Reporter(ProgressReporter):
    """The trainer's progress: a bar over iterations, or JSON "train" records."""

    def start_iterations(self, start: int, total: int) -> None:
        self.start_bar(start, total, "training", "it")

    def step(self, iteration: int, total: int, losses: dict, eta: float) -> None:
        self.set_bar(iteration, loss=f"{losses['total']:.4f}")
        self.emit({"stage": "train", "progress": round(iteration / total, 4), "iteration": iteration,
                   "loss": round(losses["total"], 5), "eta_s": round(eta, 1)})


class StopRequest:
    """Turns SIGINT / SIGTERM into a flag the loop checks after each step."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def __enter__(self):
        if threading_main():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# ----------------------------------------------------------------------------------------------


def train(config: TrainConfig, resume: bool = False, progress: str = "bar") -> Result:
    """Run (or resume) training as configured; returns where the bundle went."""
    distributed = _init_distributed(config.device)
    rank, world = dist_utils.rank(), dist_utils.world_size()
    report = Reporter(progress, enabled=rank == 0)
    try:
        return _train(config, resume, report, rank, world)
    finally:
        report.close()
        if distributed:
            torch.distributed.destroy_process_group()


def _train(config: TrainConfig, resume: bool, report: Reporter, rank: int, world: int) -> Result:
    output = Path(config.output)
    device = _device(config.device)
    config_file = output / "config.yaml"
    if resume:
        if not (output / CHECKPOINT).is_file():
            raise TrainingSetupError(f"{output}: nothing to resume (no {CHECKPOINT}); start without --resume")
        saved = yaml.safe_load(config_file.read_text())
        _check_resume_config(saved, config.to_dict(), output)
        finished = _finished(output, config.optim.iterations)
        if finished is not None:
            report.message(f"{output}: the run is complete ({config.optim.iterations} iterations) and its bundle "
                           f"is {finished.bundle}; nothing to resume, nothing was written")
            report.emit({"stage": "done", "progress": 1.0, "bundle": str(finished.bundle), "complete": True})
            return finished
    elif (output / CHECKPOINT).exists():
        raise TrainingSetupError(f"{output}: holds a checkpoint of an earlier run; pass --resume to continue "
                                 "it, or choose another output folder")

    store = _open_store(config, output, report, rank)
    parent = _parent_bundle(config, store)  # warm start: checked against the store before anything is written
    splits = store.splits(validation_fraction=_validation_fraction(config, store))
    labeled_ids = splits.train
    if not labeled_ids:
        raise TrainingSetupError(f"{store.root}: has no labeled training case "
                                 f"({len(store.cases('labeled'))} labeled, {len(splits.validation)} of them for "
                                 "validation); add labeled cases with 'guidedseg store add' or 'ingest'")
    if rank == 0:  # only once the store is known to be usable: a refused run leaves no folder behind
        output.mkdir(parents=True, exist_ok=True)
        if not resume:
            with atomic_path(config_file) as tmp:
                tmp.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    if config.uses_unlabeled and not splits.unlabeled and config.data.unlabeled_batch > 0:
        report.message(f"note: {store.root} has no unlabeled case; {config.method} learns from labeled crops only")

    if parent is not None:  # the bundle's preprocessing and classes (its network's head, grown by new organs)
        plan, class_values = _inherited_plan(config, parent, store, labeled_ids, output, resume, report, rank)
    else:
        plan = _plan(config, store, labeled_ids, output, resume, report, rank)
        class_values = _classes(store, labeled_ids, output, resume, report, rank)
    cache = Path(config.data.cache) if config.data.cache else output / "cache"
    data = TrainingData(store, plan, cache, config.data.partial_labels, class_values)
    unlabeled_ids = splits.unlabeled if config.uses_unlabeled else []  # supervised learns from labels only
    groups = {"train": [store.case(i) for i in labeled_ids], "validation": [store.case(i) for i in splits.validation],
              "unlabeled": [store.case(i) for i in unlabeled_ids], "monitor": _monitor_cases(config, store, splits)}
    if rank != 0:
        torch.distributed.barrier()  # rank 0 fills the cache first; the others then read it
    prepared = {kind: data.prepare(cases, lambda i, n, cid, k=kind: report.stage(f"prepare-{k}", i, n, case=cid))
                for kind, cases in groups.items()}
    if rank == 0 and world > 1:
        torch.distributed.barrier()

    network_spec = config.network_spec()
    if rank == 0 and network_spec["architecture"] == "unet3d" and 2 * config.network.widths[0] < len(class_values):
        report.message(f"warning: network.widths starts at {config.network.widths[0]} channels for {len(class_values)} "
                       f"classes; a full-resolution level narrower than half the class count left most phantom organs "
                       f"unlearned (Testing/BENCHMARKS.md); give it at least {-(-len(class_values) // 2)}")
    method_name = config.method
    torch.manual_seed(config.seed)
    method = build_method(method_name, network_spec, data.num_classes, config.method_options(), config.optim.iterations)
    if parent is not None and not resume:
        _load_parent_weights(method, config.init_from, report, config.seed, class_values)
    divisor = method.networks["A"].divisor
    patch = _patch(config, prepared["train"], plan, divisor)
    unlabeled_batch = config.data.unlabeled_batch if config.uses_unlabeled else 0
    augmentation = _augmentation(config, store, class_values, plan, report, rank)
    sampler = CropSampler(prepared["train"], prepared["unlabeled"], patch, config.data.labeled_batch,
                          unlabeled_batch, config.data.foreground, config.seed, augmentation)
    for count, what in ((config.data.labeled_batch, "labeled_batch"), (sampler.unlabeled_batch, "unlabeled_batch")):
        if count % world:
            raise ConfigError(f"data.{what} {count} must be divisible by the {world} processes")
    amp = config.optim.amp == "on" or (config.optim.amp == "auto" and device.type == "cuda")
    refusal = _cpu_bf16_refusal(patch, divisor) if amp and device.type == "cpu" else None
    if refusal:
        report.message(f"warning: optim.amp=on ignored: {refusal}; training runs in float32")
        amp = False
    # Channels-last feeds the tensor cores (CUDA) and the bf16 kernels (CPU with AMX / AVX512-BF16).
    channels_last = device.type == "cuda" or (amp and device.type == "cpu")
    method.to(device)
    if channels_last:
        method.to(memory_format=torch.channels_last_3d)
    if config.optim.optimizer == "adamw":
        optimiser = torch.optim.AdamW(method.parameters(), lr=config.optim.lr, weight_decay=config.optim.weight_decay)
    else:
        optimiser = torch.optim.SGD(method.parameters(), lr=config.optim.lr, momentum=config.optim.momentum,
                                    weight_decay=config.optim.weight_decay, nesterov=False)
    amp_dtype = torch.float16 if device.type == "cuda" and not torch.cuda.is_bf16_supported() else torch.bfloat16
    scaler = torch.amp.GradScaler(device.type, enabled=amp and amp_dtype == torch.float16)

    start, best = 0, {"score": -1.0, "iteration": 0, "validation": None}
    if resume:
        state = torch.load(output / CHECKPOINT, map_location=device, weights_only=True)
        method.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        scaler.load_state_dict(state["scaler"])
        start = int(state["iteration"])
        best = {"score": float(state["best_score"]), "iteration": int(state["best_iteration"]),
                "validation": json.loads(state["best_validation"])}
        report.message(f"resuming {output} at iteration {start}")
    model = method
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            method, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)

    total = config.optim.iterations
    log = MetricLog(output, start, rank == 0)
    unused = f" ({len(splits.unlabeled)} unlabeled not used)" if len(unlabeled_ids) < len(splits.unlabeled) else ""
    report.message(f"{method_name}: {len(labeled_ids)} labeled, {len(unlabeled_ids)} unlabeled{unused}, "
                   f"{len(splits.validation)} validation cases; patch {list(patch)} (z, y, x); "
                   f"{total} iterations on {device}" + (f" x {world} processes" if world > 1 else ""))
    loader = torch.utils.data.DataLoader(IterationBatches(sampler, start, total, rank, world), batch_size=None,
                                         num_workers=config.data.workers, pin_memory=device.type == "cuda",
                                         persistent_workers=False)
    if parent is not None and not resume:
        best = _start_validation(method, prepared["validation"], patch, config, device, class_values, report,
                                 rank, world, log, output, best)
        parent["warm_start"]["start_validation"] = best["validation"]
    report.start_iterations(start, total)
    began, iteration, stopped = time.monotonic(), start, None
    skipped_in_a_row = 0
    step_time = 0.0  # training steps only, without validation and checkpoints
    method.train()  # validation switches to eval and back
    with StopRequest() as stop:
        for iteration, tensors in enumerate(loader, start=start):
            step_began = time.monotonic()
            torch.manual_seed(_step_seed(config.seed, iteration, rank))  # dropout masks of this step
            lr = config.optim.lr * (1 - iteration / total) ** config.optim.poly_power
            for group in optimiser.param_groups:
                group["lr"] = lr
            batch = Batch(**tensors).to(device)
            if channels_last:
                batch.image = batch.image.contiguous(memory_format=torch.channels_last_3d)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
                losses = model(batch, iteration)
            loss = losses["total"]
            if not torch.isfinite(loss):
                raise FloatingPointError(f"iteration {iteration}: loss is {loss.item()} "
                                         f"({ {k: round(v.item(), 4) for k, v in losses.items()} }); "
                                         "lower optim.lr, or set optim.amp=off")
            optimiser.zero_grad(set_to_none=True)
            if rank == 0 and config.gradients_every and (iteration + 1) % config.gradients_every == 0:
                log.gradients(iteration + 1, _gradient_norms(method))
            scaler.scale(loss).backward()
            scaler.unscale_(optimiser)
            norm = torch.nn.utils.clip_grad_norm_(method.parameters(), config.optim.grad_clip or math.inf)
            finite = bool(torch.isfinite(norm))
            if finite or scaler.is_enabled():
                scaler.step(optimiser)  # a float16 scaler skips a non-finite step itself and lowers its scale
            scaler.update()
            skipped_in_a_row = 0 if finite else skipped_in_a_row + 1
            if not finite and not scaler.is_enabled():  # one NaN step would make every later step NaN
                report.message(f"iteration {iteration}: gradient norm is {norm.item()}; step skipped")
            if skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
                raise FloatingPointError(f"iteration {iteration}: {skipped_in_a_row} steps in a row had a "
                                         "non-finite gradient; lower optim.lr, or set optim.amp=off")
            done = iteration + 1
            values = _mean_over_processes(losses, world)  # .tolist() waits for the GPU, so the timing is real
            step_time += time.monotonic() - step_began
            elapsed = time.monotonic() - began
            report.step(done, total, values, elapsed / (done - start) * (total - done))
            log.step(done, lr, values)
            last = done == total
            if done % config.validation.every == 0 or last:
                result = _validate(method, prepared["validation"], patch, config, device, class_values, report,
                                   rank, world)
                if result is not None:
                    log.validation(done, result)
                    report.message(f"iteration {done}: validation mean Dice {result['mean_dice']:.4f}")
                    if result["mean_dice"] > best["score"] or best["validation"] is None:
                        best = {"score": result["mean_dice"], "iteration": done, "validation": result}
                        if rank == 0:
                            _save(output / BEST, {"model": method.state_dict(), "iteration": done})
                if prepared["monitor"]:
                    watched = _validate(method, prepared["monitor"], patch, config, device, class_values, report,
                                        rank, world, stage="monitor")
                    if watched is not None:
                        log.validation(done, watched, prefix="monitor_")
                        report.message(f"iteration {done}: monitor (unlabeled cases' references, not used to "
                                       f"choose weights) mean Dice {watched['mean_dice']:.4f}")
            if stop.signal is not None or done % config.checkpoint_every == 0 or last:
                if rank == 0:
                    _save(output / CHECKPOINT, {
                        "model": method.state_dict(), "optimiser": optimiser.state_dict(),
                        "scaler": scaler.state_dict(), "iteration": done, "best_score": best["score"],
                        "best_iteration": best["iteration"], "best_validation": json.dumps(best["validation"])})
            if stop.signal is not None:
                stopped = stop.signal
                break
        if world > 1:
            torch.distributed.barrier()
    report.close()
    log.close()
    if stopped is not None:
        script = os.path.relpath(Path(__file__).with_name("train.py"))
        report.message(f"stopped by signal {stopped} after iteration {iteration + 1}; checkpoint saved in "
                       f"{output / CHECKPOINT}; continue with --resume: python {script} --output {output} --resume")
        return Result("stopped", iteration + 1, None, best["validation"], stopped)

    bundle = None
    if rank == 0:
        if splits.validation and (output / BEST).is_file():
            method.load_state_dict(torch.load(output / BEST, map_location=device, weights_only=True)["model"])
        cost = {"seconds_per_iteration": round(step_time / max(1, total - start), 4), "peak_memory_mb": _peak_memory_mb(device)}
        bundle = _write_bundle(config, method, store, plan, patch, class_values, best, labeled_ids, splits, output, cost,
                               parent)
        report.message(format_table(best["validation"], store.labels))
        report.message(f"model bundle: {bundle}")
        report.emit({"stage": "done", "progress": 1.0, "bundle": str(bundle)})
    return Result("finished", total, bundle, best["validation"])


# ----------------------------------------------------------------------------------------------
# set-up


def _init_distributed(device: str) -> bool:
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist_utils.active():
        return False
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
    return True


def _device(name: str) -> torch.device:
    try:
        return resolve_device(name, int(os.environ.get("LOCAL_RANK", "0")))
    except DeviceError as error:
        raise ConfigError(str(error)) from None


def _open_store(config: TrainConfig, output: Path, report: Reporter, rank: int) -> CaseStore:
    if config.store is None:
        root = output / "phantom-store"
        if rank == 0 and not (root / "dataset.json").exists():
            import shutil

            from GuidedSegLib.phantoms import write_phantom_store

            p = config.phantoms
            report.message(f"no store given: writing {p.cases} synthetic phantoms ({p.labeled} labeled, "
                           f"{p.test} test) to {root}")
            partial = root.with_name(f".partial-{root.name}")  # renamed into place once complete
            shutil.rmtree(partial, ignore_errors=True)
            count = iter(range(1, p.cases + p.test + 1))
            write_phantom_store(partial, cases=p.cases, labeled=p.labeled, test=p.test, seed=p.seed,
                                size=tuple(p.size), spacing=tuple(p.spacing), progress=lambda _: report.stage("phantoms", next(count), p.cases + p.test))
            os.replace(partial, root)
        if dist_utils.active():
            torch.distributed.barrier()
    else:
        root = Path(config.store)
    if not root.exists():
        raise TrainingSetupError(f"{root}: no such store folder")
    store = CaseStore(root)
    if not store.organs:
        raise TrainingSetupError(f"{root}: the store's label set has no organ")
    if not store.cases():
        raise TrainingSetupError(f"{root}: the store is empty; add cases with 'guidedseg store add'")
    return store


def _plan(config, store, labeled_ids, output: Path, resume: bool, report: Reporter, rank: int) -> PreprocessingPlan:
    plan_file = output / "plan.json"
    if resume or (rank != 0 and plan_file.exists()):
        return PreprocessingPlan.from_dict(json.loads(plan_file.read_text()))
    name = config.data.preprocessing
    if name == "planned":
        from GuidedSegLib.imageio import read_image

        ids = labeled_ids[:PLANNING_CASES]
        images = [read_image(store.case(i).image) for i in ids]
        labels = [read_image(store.case(i).label) for i in ids]
        plan = plan_from_dataset(images, labels, modality=store.modality)
    elif name in PRESETS:
        plan = PRESETS[name]
    else:
        raise ConfigError(f"data.preprocessing {name!r} is not 'planned' or a preset: {sorted(PRESETS)}")
    if rank == 0:
        with atomic_path(plan_file) as tmp:
            tmp.write_text(json.dumps(plan.to_dict(), indent=2))
        report.message(f"preprocessing ({plan.source}): spacing {plan.target_spacing} mm (x, y, z), "
                       f"clip {plan.clip}, normalisation {plan.normalisation}")
    if dist_utils.active():
        torch.distributed.barrier()
    return plan


def _classes(store, labeled_ids, output: Path, resume: bool, report: Reporter, rank: int) -> list[int]:
    """The label values the network learns: background and every organ annotated in a training case.

    An organ no training case annotates has no positive example; with partial labels nothing even
    separates it from background, so its channel would soak up the background mass. It is left
    out of the network and the bundle (with a warning). Saved in ``classes.json`` for ``--resume``.
    """
    classes_file = output / "classes.json"
    if resume:
        if not classes_file.is_file():  # a run saved before classes.json existed learned every label
            return sorted(store.labels)
        values = json.loads(classes_file.read_text())["values"]
        missing = [v for v in values if v not in store.labels]
        if missing:
            raise TrainingSetupError(f"{store.root}: label values {missing} of the run in {output} are no longer "
                                     "in the store's label set; start a new run instead of --resume")
        return values
    counts = _annotating(store, labeled_ids)
    untrained = {v: store.labels[v] for v, n in counts.items() if n == 0}
    if len(untrained) == len(counts):
        raise TrainingSetupError(f"{store.root}: none of the {len(labeled_ids)} labeled training cases annotates "
                                 "any organ; their labels hold background only")
    values = [0] + [v for v in sorted(counts) if counts[v]]
    if rank == 0:
        if untrained:
            report.message(f"warning: {', '.join(untrained.values())}: annotated in none of the {len(labeled_ids)} "
                           "labeled training cases, so the model will not segment these organs; label them "
                           "in a training case to include them")
        with atomic_path(classes_file) as tmp:
            tmp.write_text(json.dumps({"values": values, "not_trained": {str(v): n for v, n in untrained.items()}}))
    return values


def _annotating(store, labeled_ids) -> dict[int, int]:
    """How many of ``labeled_ids`` annotate each of the store's organs."""
    counts = {v: 0 for v in store.organs}
    for case_id in labeled_ids:
        for value in store.annotated_labels(case_id):
            if value in counts:
                counts[value] += 1
    return counts


def _validation_fraction(config: TrainConfig, store) -> float | None:
    """The share of labeled cases to validate on (None: the store's own setting)."""
    fraction = config.validation.fraction
    if fraction != "auto":
        return float(fraction)
    return 0.0 if len(store.cases("labeled")) < SMALL_STORE else None


def _monitor_cases(config: TrainConfig, store, splits) -> list:
    """Unlabeled cases with a reference in ``validation.monitor``, read as labeled cases."""
    if not config.validation.monitor:
        return []
    folder = Path(config.validation.monitor)
    folder = folder if folder.is_absolute() else store.root / folder
    if not folder.is_dir():
        raise TrainingSetupError(f"{folder}: validation.monitor is not a folder of reference label maps")
    cases = []
    for case_id in splits.unlabeled:
        reference = folder / f"{case_id}.nii.gz"
        if reference.is_file():
            # its own cache entry: under the plain id, the unlabeled copy and this one would
            # invalidate each other's cached preprocessing on every run
            cases.append(dataclasses.replace(store.case(case_id), case_id=f"{case_id}.monitor", kind="labeled",
                                             label=reference, annotated=None))
        if len(cases) == config.validation.monitor_cases:
            break
    if not cases:
        raise TrainingSetupError(f"{folder}: holds no <case id>.nii.gz of the store's unlabeled cases")
    return cases


# ----------------------------------------------------------------------------------------------
# warm start (--init-from BUNDLE): every network starts from the bundle's weights


def _parent_bundle(config: TrainConfig, store) -> dict | None:
    """The metadata of the bundle to start from (None: train from scratch), checked before anything
    is written: a format this library reads, and a label set equal to the store's (organs the
    bundle left untrained count as its labels: ``_inherited_plan`` grows the head by them)."""
    if not config.init_from:
        return None
    from GuidedSegLib.bundle import check_metadata, read_metadata

    folder = Path(config.init_from)
    parent = read_metadata(folder)  # refuses a newer bundle format
    check_metadata(folder, parent)
    not_trained = (parent.get("training") or {}).get("not_trained") or {}
    problem = label_mismatch(parent["labels"], not_trained, store.labels)
    if problem:
        raise TrainingSetupError(f"cannot fine-tune {folder} on {store.root}: {problem}; a warm start keeps the "
                                 "bundle's labels (new organs need training from scratch, without --init-from)")
    names = list(parent["networks"])
    wanted = ["A", "B"] if config.method != "supervised" else ["A"]
    parent["warm_start"] = {"from": str(folder.resolve()),
                            "networks": {n: (n if n in names else "A") for n in wanted}}
    return parent


def _inherited_plan(config: TrainConfig, parent: dict, store, labeled_ids, output: Path, resume: bool,
                    report: Reporter, rank: int):
    """The parent's preprocessing plan (a preset named in data.preprocessing replaces it) and its
    classes, plus every organ the parent never learned (annotated in none of its cases) that a
    labeled training case now annotates: the head grows by those (``_load_parent_weights``).
    Without this, an organ missing from round 0's cases could never be learned by a warm start.
    plan.json and classes.json are written for --resume as a fresh run writes them."""
    name = config.data.preprocessing
    plan = PRESETS[name] if name in PRESETS else PreprocessingPlan.from_dict(parent["preprocessing"])
    if resume and (output / "classes.json").is_file():
        return plan, json.loads((output / "classes.json").read_text())["values"]
    inherited = [int(v) for v in parent["labels"]]
    not_trained = {int(v): n for v, n in ((parent.get("training") or {}).get("not_trained") or {}).items()}
    counts = _annotating(store, labeled_ids)
    grown = {v: counts[v] for v in not_trained if counts.get(v)}
    values = sorted(inherited + list(grown))
    if rank == 0:
        with atomic_path(output / "plan.json") as tmp:
            tmp.write_text(json.dumps(plan.to_dict(), indent=2))
        with atomic_path(output / "classes.json") as tmp:
            tmp.write_text(json.dumps({"values": values, "not_trained": {str(v): n for v, n in not_trained.items()
                                                                        if v not in grown}}))
        report.message(f"warm start from {config.init_from}: its preprocessing ({plan.source}) and its "
                       f"{len(inherited) - 1} organs are kept")
        if grown:
            report.message("warm start: the head grows by " + ", ".join(
                f"{not_trained[v]} (annotated in {n} labeled case{'s' if n > 1 else ''}, never by the parent's)"
                for v, n in grown.items())
                + "; a new class starts as a copy of background, the others keep the parent's weights")
    return plan, values


def _grown(fresh: dict, parent: dict, inherited: list[int], values: list[int]) -> dict:
    """``parent``'s state dict on the shapes of ``fresh`` (the method's new network). A tensor with a
    class axis (``len(inherited)`` in the parent, ``len(values)`` here: a head's output channels)
    takes the parent's slices at their classes' places, and each new class starts as a copy of
    background, whose bias it shares: background's and the new classes' biases become
    b - log(1 + new) (MiB's initialisation, Cermelli et al. 2020). The parent labelled the new
    organ's voxels background, so at step 0 every old class keeps its probability and the new
    organ only has to rise above background where it is annotated. Any other shape difference is
    left for ``load_state_dict`` to refuse."""
    if inherited == values:
        return parent
    added = [i for i, v in enumerate(values) if v not in inherited]
    places = torch.tensor([values.index(v) for v in inherited])
    background = values.index(0)
    state = {}
    for key, weight in parent.items():
        target = fresh.get(key)
        differ = [] if target is None else [d for d in range(weight.dim()) if weight.shape[d] != target.shape[d]]
        if (target is not None and weight.dim() == target.dim() and len(differ) == 1
                and weight.shape[differ[0]] == len(inherited) and target.shape[differ[0]] == len(values)):
            axis = differ[0]
            weight = target.clone().index_copy_(axis, places, weight.to(target.dtype))
            source = weight.select(axis, background).clone()
            if weight.dim() == 1:  # a bias
                source -= math.log(1 + len(added))
                weight[background] = source
            for index in added:
                weight.select(axis, index).copy_(source)
        state[key] = weight
    return state


def _load_parent_weights(method, folder, report: Reporter, seed: int, values: list[int]) -> None:
    """Every network of ``method`` from the bundle: A from A, B from B; a network the bundle lacks
    (B, when a one-network bundle starts a two-network method) from its A, which is said, with
    noise of 5% of each weight tensor's SD added: two identical networks get identical gradients
    from the symmetric CPS objective and would never become two. Classes in ``values`` that the
    parent lacks start as copies of background (``_grown``)."""
    from GuidedSegLib.bundle import load_extra_tensors, load_networks

    metadata, networks = load_networks(folder, "cpu")
    inherited = [int(v) for v in metadata["labels"]]
    taken = method.load_bundle_tensors(load_extra_tensors(folder))
    if taken:
        report.message(f"warm start: networks {', '.join(taken)} keep the parent's CGMM mixture statistics")
    for name, network in method.networks.items():
        source = name if name in networks else "A"
        try:
            network.load_state_dict(_grown(network.state_dict(), networks[source].state_dict(), inherited, values))
        except RuntimeError as error:
            raise TrainingSetupError(f"{folder}: network {source} does not fit the method's network {name} "
                                     f"({str(error).splitlines()[0]}); a warm start keeps the bundle's network "
                                     "settings: leave network.* as the bundle has them") from None
        if source != name:
            generator = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for weight in network.parameters():
                    if weight.numel() > 1:
                        weight.add_(torch.randn(weight.shape, generator=generator) * 0.05 * weight.std())
            report.message(f"note: {folder} has no network {name}; {name} starts from network {source} with a "
                           "little noise (5% of each weight's SD), so that the two networks can differ")


def _start_validation(method, cases, patch, config, device, class_values, report, rank, world, log, output, best):
    """Validate the parent's weights before the first step (iteration 0 of validation.csv): the
    fine-tune starts from this Dice, and keeps these weights unless a later validation beats it."""
    result = _validate(method, cases, patch, config, device, class_values, report, rank, world)
    if result is None:
        return best
    log.validation(0, result)
    report.message(f"iteration 0 (the parent's weights): validation mean Dice {result['mean_dice']:.4f}")
    if rank == 0:
        _save(output / BEST, {"model": method.state_dict(), "iteration": 0})
    return {"score": result["mean_dice"], "iteration": 0, "validation": result}


def _augmentation(config: TrainConfig, store, class_values, plan: PreprocessingPlan, report: Reporter,
                  rank: int) -> Augmentation:
    """The crops' augmentation from ``data.mirror`` and ``data.augment``.

    "left-right" (default) mirrors across the patient's midline with paired organs swapped; it is
    left out, with a message, when a sided organ has no twin among the classes. "all" also flips
    the other two axes plainly (for data without a fixed orientation); "none" never mirrors.
    """
    mode = config.data.mirror
    base = Augmentation() if config.data.augment else Augmentation.none()
    if mode == "none":
        return base
    names = [store.labels[v] for v in class_values]
    permutation, unpaired = mirror_permutation(names)
    left_right = 2 - next(i for i, letter in enumerate(plan.orientation.upper()) if letter in "LR")
    others = tuple(a for a in (0, 1, 2) if a != left_right) if mode == "all" else ()
    if permutation is None:
        if rank == 0:
            report.message(f"no left-right mirroring: {', '.join(unpaired)} {'has' if len(unpaired) == 1 else 'have'} "
                           "a side but no other-side twin among the trained organs")
        return dataclasses.replace(base, flip_axes=others)
    return dataclasses.replace(base, mirror_axis=left_right, permutation=tuple(permutation), flip_axes=others)


def _cpu_bf16_refusal(patch, divisor: int) -> str | None:
    """Why bf16 autocast must not run on this CPU for this patch, or None (Testing/BENCHMARKS.md)."""
    if patch[0] // divisor < 3:
        # PyTorch 2.13: a bf16 Conv3d over a feature map 2 voxels deep (first axis) returns weight
        # gradients of 1e30 or NaN in a third of the steps.
        return (f"patch {list(patch)} (z, y, x) leaves a feature map 2 voxels deep, where bfloat16 "
                f"convolutions on the CPU give wrong gradients (a patch of at least {3 * divisor} along z "
                f"avoids this)")
    if not cpu_has_native_bf16():
        # OpenKBP GuidedNet on an AVX2-only CPU: about 2 minutes per step in bf16, 5 s in float32.
        return ("this CPU has no bfloat16 hardware (AVX512-BF16 or AMX), where bf16 autocast is emulated "
                "and about 24 times slower than float32")
    return None


def _patch(config: TrainConfig, cases, plan: PreprocessingPlan, divisor: int) -> tuple[int, int, int]:
    """The training patch (z, y, x): given, or derived from the cases' median shape.

    Automatic: the median preprocessed shape rounded up to the network's divisor, then the axis
    with the largest physical extent shrunk step by step until the patch fits ``patch_voxels``.
    """
    if config.data.patch != "auto":
        patch = tuple(int(p) for p in config.data.patch)
        bad = [p for p in patch if p % divisor]
        if bad:
            raise ConfigError(f"data.patch {list(patch)} must be multiples of {divisor}, the input size "
                              f"divisor of network {config.network_spec()['architecture']}")
        return patch
    median = np.median([c.shape for c in cases], axis=0)
    patch = [max(divisor, int(math.ceil(m / divisor)) * divisor) for m in median]
    spacing = list(plan.target_spacing[::-1]) if plan.target_spacing else [1.0, 1.0, 1.0]
    while np.prod(patch) > config.data.patch_voxels:
        extents = [p * s if p > divisor else -1 for p, s in zip(patch, spacing)]
        axis = int(np.argmax(extents))
        if extents[axis] < 0:
            break
        patch[axis] -= divisor
    return tuple(patch)


def _finished(output: Path, total: int) -> Result | None:
    """The result of a run whose checkpoint is at its last iteration and whose bundle was written
    (the newest ``bundle*`` folder), else None."""
    state = torch.load(output / CHECKPOINT, map_location="cpu", weights_only=True)
    if int(state["iteration"]) < total:
        return None
    bundles = [p for p in output.glob("bundle*") if (p / "model.json").is_file()
               and (p.name == "bundle" or p.name.removeprefix("bundle-").isdigit())]
    if not bundles:
        return None  # stopped between the last checkpoint and the bundle: resuming writes it
    newest = max(bundles, key=lambda p: int(p.name.removeprefix("bundle-")) if "-" in p.name else 1)
    return Result("finished", total, newest, json.loads(state["best_validation"]))


def _check_resume_config(saved: dict, current: dict, output: Path) -> None:
    """A resumed run must be the same run: only where it logs or how many workers may change
    (and where its folder is now)."""
    free = {"output", "device", "data.workers", "log_every", "checkpoint_every", "gradients_every"}

    def flat(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from flat(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v

    a, b = dict(flat(saved)), dict(flat(current))
    defaults = dict(flat(TrainConfig().to_dict()))  # a setting added since the run was saved had its default
    changed = sorted(k for k in set(a) | set(b) if k not in free and a.get(k, defaults.get(k)) != b.get(k))
    if changed:
        raise TrainingSetupError(f"{output}: --resume with settings that differ from the saved run: "
                                 + ", ".join(f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in changed))


def _gradient_norms(method) -> dict[str, float]:
    """The gradient norm of each weighted loss term the method last computed (its graph is kept)."""
    parameters = [p for p in method.parameters() if p.requires_grad]
    norms = {}
    for name, term in method.terms.items():
        if not term.requires_grad:
            norms[name] = 0.0
            continue
        grads = torch.autograd.grad(term, parameters, retain_graph=True, allow_unused=True)
        norms[name] = float(torch.sqrt(sum((g.float().square().sum() for g in grads if g is not None),
                                           torch.zeros((), device=term.device))))
    return norms


def _mean_over_processes(losses: dict[str, torch.Tensor], world: int) -> dict[str, float]:
    """The losses of the whole global batch (each process holds its share's)."""
    stacked = torch.stack([v.detach().float() for v in losses.values()])
    if world > 1:
        stacked = dist_utils.all_sum(stacked) / world
    return dict(zip(losses, stacked.tolist()))


def _step_seed(seed: int, iteration: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, iteration, rank]).generate_state(1)[0])


def _save(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


# ----------------------------------------------------------------------------------------------
# validation and results


@torch.inference_mode()
def _validate(method, cases, patch, config: TrainConfig, device, class_values, report: Reporter, rank, world,
              stage: str = "validate"):
    """Sliding-window Dice on ``cases`` (rank 0), with each organ's predicted-to-reference volume
    ratio (a ratio far above 1 is over-segmentation); None when there is no case."""
    if rank != 0 or not cases:
        if world > 1:
            torch.distributed.barrier()
        return None
    from monai.inferers import sliding_window_inference

    method.eval()
    names = ["A", "B"] if config.validation.ensemble and "B" in method.networks else ["A"]
    networks = [method.networks[n] for n in names]

    def average(x):
        return sum(torch.softmax(net(x)[0].float(), 1) for net in networks) / len(networks)

    scores, ratios = [], []
    stride = tuple(max(1, int(p * (1 - config.validation.overlap))) for p in patch)
    for index, case in enumerate(cases):
        image = torch.from_numpy(np.array(case.image(), dtype=np.float32))[None, None].to(device)
        steps = count_windows(tuple(image.shape[2:]), tuple(patch), stride)
        report.part(stage, index, len(cases), case.case_id, 0, steps)
        shown = {"windows": 0, "time": time.monotonic()}

        def predict(x, index=index, case=case, steps=steps):  # the windows done, at most once a second
            shown["windows"] = min(steps, shown["windows"] + len(x))
            if time.monotonic() - shown["time"] >= 1.0:
                shown["time"] = time.monotonic()
                report.part(stage, index, len(cases), case.case_id, shown["windows"], steps)
            return average(x)

        probabilities = sliding_window_inference(image, patch, 2, predict, overlap=config.validation.overlap,
                                                 mode="gaussian")
        prediction = probabilities.argmax(1)[0].cpu().numpy()
        reference = case.label()
        organs = sorted(case.locations)  # annotated organs present in the reference
        scores.append({class_values[k]: d for k, d in per_class_dice(prediction, reference, organs).items()})
        ratios.append({class_values[k]: float((prediction == k).sum()) / max(1, int((reference == k).sum()))
                       for k in organs})
    method.train()
    if world > 1:
        torch.distributed.barrier()
    summary = summarise(scores)
    volume = {k: m for k, (m, _, _) in summarise(ratios).items()}
    per_organ = {str(k): {"dice": m, "sd": s, "n": n, "volume_ratio": volume[k]} for k, (m, s, n) in summary.items()}
    mean = float(np.mean([v["dice"] for v in per_organ.values()])) if per_organ else 0.0
    return {"mean_dice": mean, "per_organ": per_organ, "cases": len(cases)}


def format_table(validation: dict | None, labels: dict[int, str]) -> str:
    if not validation:
        return (f"no validation case (validation.fraction 0, or 'auto' with fewer than {SMALL_STORE} labeled cases, "
                "so every labeled case trained): the final weights were kept")
    lines = [f"validation ({validation['cases']} cases): Dice per organ, over cases where it is annotated",
             f"  {'organ':<24} {'Dice':>7} {'SD':>7} {'n':>4}"]
    for value, row in validation["per_organ"].items():
        lines.append(f"  {labels[int(value)]:<24} {row['dice']:7.4f} {row['sd']:7.4f} {row['n']:4d}")
    lines.append(f"  {'mean':<24} {validation['mean_dice']:7.4f}")
    return "\n".join(lines)


def _peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated on CUDA, else the process's peak resident memory."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: kB


def _write_bundle(config, method, store, plan, patch, class_values, best, labeled_ids, splits, output, cost,
                  parent=None) -> Path:
    stride = config.inference.stride
    window = tuple(config.inference.patch or patch)
    stride = tuple(stride) if stride else tuple(max(1, w // 2) for w in window)
    names = ["A", "B"] if "B" in method.networks else ["A"]
    labels = store.labels
    metadata = {
        "name": f"{store.name}-{config.method}",
        "library_version": GuidedSegLib.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "method": config.method,
        "network": method.networks["A"].config(),
        "labels": {str(v): labels[v] for v in class_values},
        "colours": {str(v): list(label_colour(labels[v])) for v in class_values if v != 0},
        "preprocessing": plan.to_dict(),
        "patch": list(window),
        "stride": list(stride),
        "training": {
            "store": str(store.root), "store_name": store.name,
            "labeled": {cid: store.case(cid).label_version for cid in labeled_ids},
            "validation": {cid: store.case(cid).label_version for cid in splits.validation},
            "unlabeled": len(splits.unlabeled) if config.uses_unlabeled else 0,
            "not_trained": {str(v): labels[v] for v in store.organs if v not in class_values},
            "iterations": config.optim.iterations,
            "best_iteration": best["iteration"] if splits.validation else config.optim.iterations,
            "selection": (f"best validation Dice of {len(splits.validation)} held-out cases" if splits.validation else
                          f"final weights: no validation case (all {len(labeled_ids)} labeled cases trained)"),
            "seed": config.seed, "config": config.to_dict(), **cost,
            "cases": training_cases(store, {"train": labeled_ids, "validation": splits.validation}),
        },
        "validation": best["validation"],
        "parent": None,
    }
    if parent is not None:
        metadata.update(lineage_metadata(config.init_from, parent))
        metadata["name"] = f"{metadata['name']}-v{len(metadata['lineage']) + 1}"  # version N of a chain
        metadata["warm_start"] = parent["warm_start"]
    folder = output / "bundle"
    n = 2
    while folder.exists():
        folder = output / f"bundle-{n}"
        n += 1
    networks = {name: method.networks[name] for name in names}
    return write_bundle(folder, networks, metadata, method.bundle_tensors())


class MetricLog:
    """``log.csv`` (losses per step), ``validation.csv`` and TensorBoard under ``tensorboard/``.

    On resume the rows after the checkpoint are dropped, so the logs read as one run.
    """

    def __init__(self, output: Path, start: int, enabled: bool):
        self.enabled, self.output = enabled, output
        self.writer = None
        self.columns: list[str] | None = None
        if not enabled:
            return
        for name in ("log.csv", "validation.csv", "monitor_validation.csv", "gradients.csv"):
            _truncate_csv(output / name, start)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(output / "tensorboard"), purge_step=start + 1 if start else None)
        except ImportError:
            self.writer = None

    def step(self, iteration: int, lr: float, losses: dict) -> None:
        if not self.enabled:
            return
        row = {"iteration": iteration, "lr": lr, **losses}
        if self.columns is None:
            self.columns = list(row)
        _append_row(self.output / "log.csv", row, self.columns)
        if self.writer is not None:
            for key, value in losses.items():
                self.writer.add_scalar(f"loss/{key}", value, iteration)
            self.writer.add_scalar("lr", lr, iteration)

    def gradients(self, iteration: int, norms: dict[str, float]) -> None:
        """Each term's gradient norm and its share of their sum, to ``gradients.csv``."""
        if not self.enabled:
            return
        total = sum(norms.values()) or 1.0
        row = {"iteration": iteration, **{f"norm_{k}": v for k, v in norms.items()},
               **{f"share_{k}": v / total for k, v in norms.items()}}
        _append_row(self.output / "gradients.csv", row)
        if self.writer is not None:
            for key, value in norms.items():
                self.writer.add_scalar(f"gradient_share/{key}", value / total, iteration)

    def validation(self, iteration: int, result: dict, prefix: str = "") -> None:
        if not self.enabled:
            return
        row = {"iteration": iteration, "mean_dice": result["mean_dice"],
               **{f"dice_{k}": v["dice"] for k, v in result["per_organ"].items()},
               **{f"volume_ratio_{k}": v["volume_ratio"] for k, v in result["per_organ"].items()}}
        _append_row(self.output / f"{prefix}validation.csv", row)
        if self.writer is not None:
            self.writer.add_scalar(f"{prefix}validation/mean_dice", result["mean_dice"], iteration)
            for k, v in result["per_organ"].items():
                self.writer.add_scalar(f"{prefix}validation/volume_ratio_{k}", v["volume_ratio"], iteration)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _append_row(path: Path, row: dict, columns: list[str] | None = None) -> None:
    """One row onto a CSV file, with the header first when the file is new or empty."""
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns or list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def _truncate_csv(path: Path, start: int) -> None:
    """Keep the header and the rows of iterations <= start (all rows are dropped when start is 0)."""
    if not path.exists():
        return
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    kept = rows[:1] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= start] if start else []
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        csv.writer(handle).writerows(kept)
