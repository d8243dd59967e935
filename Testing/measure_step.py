"""Step time and peak memory of one method and network size on random crops (a script, not a test).

One training step as the trainer takes it (forward, backward, AdamW), on a batch of random
images with a random organ box, for sizing a benchmark before spending hours on it:

    OMP_NUM_THREADS=1 python Testing/measure_step.py --method dkuxnet --steps 5 \
        network.uxnet.widths=[8,16,32,64] network.uxnet.queries=24

Settings are ``section.key=value`` as for Training/train.py. Peak memory is the process's
resident peak (CPU) or the allocator's (CUDA); run one size per process.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from GuidedSegLib.methods import Batch, build_method
from Training.config import load_config


def random_batch(patch, labeled: int, unlabeled: int, classes: int, generator) -> Batch:
    image = torch.randn((labeled + unlabeled, 1, *patch), generator=generator)
    labels = torch.zeros((labeled, *patch), dtype=torch.long)
    z, y, x = (n // 4 for n in patch)
    labels[:, z:3 * z, y:3 * y, x:3 * x] = torch.randint(1, classes, (1,), generator=generator).item()
    image[:labeled] += labels.unsqueeze(1).float()
    return Batch(image, labels, torch.ones(labeled, classes, dtype=torch.bool),
                 torch.zeros(labeled, classes, dtype=torch.bool))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--method", default="dkuxnet")
    parser.add_argument("--classes", type=int, default=2, help="label classes with background (LA: 2)")
    parser.add_argument("--patch", default="32,48,48", help="z,y,x")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    config = load_config(None, [f"method={args.method}", *args.overrides])
    device = torch.device(args.device)
    patch = tuple(int(p) for p in args.patch.split(","))
    torch.manual_seed(0)
    method = build_method(args.method, config.network_spec(), args.classes, config.method_options(),
                          config.optim.iterations).to(device)
    optimiser = torch.optim.AdamW(method.parameters(), lr=config.optim.lr)
    generator = torch.Generator().manual_seed(0)
    unlabeled = config.data.unlabeled_batch if config.uses_unlabeled else 0
    times = []
    for step in range(args.steps + 1):  # the first step (allocation, kernel choice) is not counted
        batch = random_batch(patch, config.data.labeled_batch, unlabeled, args.classes, generator).to(device)
        began = time.perf_counter()
        losses = method(batch, step)
        optimiser.zero_grad(set_to_none=True)
        losses["total"].backward()
        optimiser.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
    peak = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    parameters = sum(p.numel() for p in method.networks["A"].parameters())
    per_step = sum(times[1:]) / max(1, len(times) - 1)
    print(f"{args.method} {config.network_spec()['architecture']} patch {list(patch)} "
          f"{config.data.labeled_batch}+{unlabeled} crops, {parameters:,} parameters per network, "
          f"threads {torch.get_num_threads()}: {per_step:.3f} s/step over {args.steps} steps "
          f"(first {times[0]:.3f} s), peak memory {peak:.0f} MB, loss {float(losses['total'].detach()):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
