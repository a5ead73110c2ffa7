"""How close a training step comes to this machine's limit: the step's floating-point work, and the peak a plain
matrix multiply reaches here.

* ``count_flops(fn)``: the FLOPs of everything ``fn`` runs (forward, backward, optimizer), counted by torch's own
  ``FlopCounterMode`` (matmuls, convolutions and attention; elementwise ops count zero, which is the usual
  convention for "model FLOPs": they are memory-bound and cost time, not arithmetic).
* ``gemm_peak(dtype)``: FLOP/s of a square matrix multiply large enough to run at full speed, best of several
  repetitions, with the torch threads the caller set (the same as the benchmark's workers).

Achieved FLOP/s of a step = ``count_flops`` / step time; its share of ``gemm_peak`` says how much of the step is
spent outside the arithmetic units (memory-bound ops, framework overhead, idle cores).
"""
from __future__ import annotations

import time
from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_flops", "gemm_peak"]


def count_flops(fn: Callable[[], Any]) -> int:
    """Total FLOPs of one call of ``fn`` (a multiply-add counts 2)."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def gemm_peak(dtype: torch.dtype = torch.float32, size: int = 2048, repeats: int = 5, budget: float = 2.0) -> float:
    """FLOP/s of an ``size x size`` matrix multiply in ``dtype`` on the CPU, the best of ``repeats`` timed calls.

    A dtype the CPU has no fast kernel for (bf16 without AVX-512 BF16 or AMX runs a reference loop, ~1 GFLOP/s)
    would take minutes at full size: the size shrinks (by halves, down to 256) until one call fits in
    ``budget / repeats`` seconds, judged on a 256 warm-up call, which is enough to tell a slow path from a fast one."""
    generator = torch.Generator().manual_seed(0)

    def operands(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.randn(n, n, generator=generator).to(dtype), torch.randn(n, n, generator=generator).to(dtype))

    a, b = operands(256)
    start = time.perf_counter()
    torch.mm(a, b)
    per_flop = (time.perf_counter() - start) / (2 * 256**3)
    while size > 256 and per_flop * 2 * size**3 > budget / repeats:
        size //= 2
    a, b = operands(size)
    torch.mm(a, b)  # warm-up: kernels chosen, pages touched
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best
