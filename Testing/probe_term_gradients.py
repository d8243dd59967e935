"""Diagnostic (a script, not a test): which loss term of a two-network run works against
learning one organ.

For training batches whose labeled crops hold the organ, it computes the gradient of each
weighted loss term (``method.terms``: sup, cps, gt, self, max, rectify, cons) over every network
parameter, and its inner product with the gradient of the organ's own cross-entropy on its
annotated voxels (both networks). To first order, a plain gradient step of size 1 on a term
changes the organ's cross-entropy by minus that inner product, so a positive ``dCE`` marks a
term that makes the organ harder to learn; ``cos`` is the cosine between the two gradients.
Terms that act on the features (gt, max, cons) show up here, where a logit-level view would
miss them.

    OMP_NUM_THREADS=1 python Testing/probe_term_gradients.py runs/kbp3/guidednet-seed0 --organ Mandible

Reads ``RUN/config.yaml``, ``RUN/plan.json``, ``RUN/classes.json`` and ``RUN/checkpoint.pt`` (the
latest, so a stopped run can be probed mid-way), and for ``data.patch: auto`` the bundle's patch;
the store and the cache are the run's own. Crops are drawn without augmentation.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from GuidedSegLib.methods import Batch, build_method  # noqa: E402
from GuidedSegLib.preprocessing import PreprocessingPlan  # noqa: E402
from GuidedSegLib.store import CaseStore  # noqa: E402
from GuidedSegLib.training_data import CropSampler, TrainingData  # noqa: E402
from Training.config import resume_config  # noqa: E402
from Training.trainer import _validation_fraction  # noqa: E402


def flat_gradient(loss: torch.Tensor, parameters: list[torch.Tensor]) -> torch.Tensor:
    """The gradient of ``loss`` over ``parameters`` as one vector (zeros where it does not reach),
    keeping the graph for the next term."""
    grads = torch.autograd.grad(loss, parameters, retain_graph=True, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, parameters)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--organ", required=True, help="the organ's name in the store's labels")
    parser.add_argument("--batches", type=int, default=4, help="batches holding the organ to average over")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()

    config = resume_config(args.run)
    store = CaseStore(config.store)
    values = json.loads((args.run / "classes.json").read_text())["values"]
    names = {int(v): n for v, n in store.labels.items()}
    by_name = {n: v for v, n in names.items()}
    if args.organ not in by_name or by_name[args.organ] not in values:
        raise SystemExit(f"{args.run}: trains no class named {args.organ!r}; it trains "
                         f"{', '.join(names[v] for v in values if v)}")
    organ = values.index(by_name[args.organ])
    plan = PreprocessingPlan.from_dict(json.loads((args.run / "plan.json").read_text()))
    cache = Path(config.data.cache) if config.data.cache else args.run / "cache"
    data = TrainingData(store, plan, cache, config.data.partial_labels, values)
    splits = store.splits(validation_fraction=_validation_fraction(config, store))
    holding = [c for c in data.prepare([store.case(i) for i in splits.train]) if organ in c.locations]
    if not holding:
        raise SystemExit(f"{args.run}: no labeled training case of {store.root} annotates {args.organ}")
    unlabeled = data.prepare([store.case(i) for i in splits.unlabeled])
    state = torch.load(args.run / "checkpoint.pt", map_location="cpu", weights_only=True)
    method = build_method(config.method, config.network_spec(), data.num_classes, config.method_options(),
                          config.optim.iterations)
    method.load_state_dict(state["model"])
    method.train()
    iteration = int(state["iteration"])
    patch = config.data.patch
    if patch == "auto":  # the crop the trainer derived, as the bundle records it
        bundle = args.run / "bundle" / "model.json"
        if not bundle.is_file():
            raise SystemExit(f"{args.run}: data.patch is auto and the run has no bundle yet to say which crop it "
                             "trained on; pass the run a data.patch, or probe it once it has finished")
        patch = json.loads(bundle.read_text())["patch"]
    sampler = CropSampler(holding, unlabeled, patch, config.data.labeled_batch,
                          config.data.unlabeled_batch, 1.0, args.seed)
    logits = {}
    for name, network in method.networks.items():
        network.register_forward_hook(lambda module, inputs, output, name=name: logits.__setitem__(name, output[0]))
    parameters = [p for p in method.parameters() if p.requires_grad]

    totals: dict[str, list[float]] = {}
    used, tried = 0, 0
    while used < args.batches and tried < 20 * args.batches:
        tried += 1
        batch = Batch(**sampler.batch(tried))
        annotated = batch.labels == organ
        if int(annotated.sum()) == 0:
            continue
        used += 1
        method(batch, iteration)  # sets method.terms
        n = batch.n_labeled
        organ_ce = sum(F.cross_entropy(out[:n].float(), batch.labels, reduction="none")[annotated].mean()
                       for out in logits.values())
        flat_organ = flat_gradient(organ_ce, parameters)
        for term_name, term in method.terms.items():
            if not term.requires_grad:
                totals.setdefault(term_name, []).append((0.0, 0.0, 0.0))
                continue
            flat = flat_gradient(term, parameters)
            dot = float(flat @ flat_organ)
            cos = dot / max(float(flat.norm() * flat_organ.norm()), 1e-30)
            totals.setdefault(term_name, []).append((-dot, cos, float(flat.norm())))
        print(f"batch {used}: {int(annotated.sum())} annotated {args.organ} voxels, organ CE {float(organ_ce.detach()):.3f}",
              flush=True)
    if not used:
        raise SystemExit(f"no crop of {tried} held {args.organ}")
    print(f"\n{args.run} at iteration {iteration}, {args.organ}, {used} batches: change of the organ's CE from "
          f"a unit gradient step on each term (positive: the term works against the organ)")
    print(f"{'term':<8} {'dCE':>10} {'cos':>7} {'|grad|':>9}")
    for term_name, rows in totals.items():
        mean = [sum(r[i] for r in rows) / len(rows) for i in range(3)]
        print(f"{term_name:<8} {mean[0]:>+10.4f} {mean[1]:>+7.3f} {mean[2]:>9.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
