"""Small helpers that make losses and statistics identical under PyTorch DDP and in one process.

Every helper is the identity in a single process. Under ``torchrun`` the sums a loss or a
statistic is built from are all-reduced, so ``N`` processes with ``B`` crops each compute what one
process computes with ``N * B`` crops (DDP then averages the gradients).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    return rank() == 0


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over processes, without gradient (counts, weights, metrics)."""
    if not active():
        return tensor
    tensor = tensor.detach().clone()
    dist.all_reduce(tensor)
    return tensor


def all_sum_differentiable(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over processes that gradients flow back through (pooled CGMM statistics)."""
    if not active():
        return tensor
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(tensor)


def global_mean(local_sum: torch.Tensor, local_count: torch.Tensor | float) -> torch.Tensor:
    """Mean over all processes' elements, written so that DDP's gradient averaging is exact.

    Each process returns ``local_sum * world / global_count``; their average is the global mean.
    """
    count = torch.as_tensor(local_count, dtype=torch.float32, device=local_sum.device)
    total = all_sum(count).clamp_min(1.0)
    return local_sum * world_size() / total
