"""Measure the per-block activation coefficients of the memory planner (``cascade_studio.trainers.plan``).

For each precision setting (model dtype x autocast) it runs single Stage C blocks on the CPU, with LoRA (via our
adapter, so fp32 adapter weights on a bf16 base exactly as in training) on the attention block, and records

* saved bytes: every tensor autograd keeps for backward (``saved_tensors_hooks``, unique storages, parameters
  excluded), per element of one ``[tokens x width]`` tensor;
* the forward+backward peak of live tensor bytes (``plan.measure_peak_tensor_bytes``) above the block's input
  and output gradient, per element.

The attention block is run with two cond lengths to separate the image-token part from the key/value part, once
with LoRA on q/k/v/out (``attn_image`` / ``attn_cond``: those layers keep their inputs for their weight gradients)
and once frozen (``attn_image_frozen`` / ``attn_cond_frozen``: what a grad-needing attention block keeps when the
adapter is elsewhere, e.g. a ControlNet, or an IP-Adapter's branch beside it).
Prints a ``CALIBRATION`` table to paste into plan.py; the whole-model check is ``tests/test_plan.py``.

    .venv/bin/python benchmarks/calibrate_plan.py
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from cascade_studio.adapters.lora import LoraAdapter, LoraSpec
from cascade_studio.models.blocks import AttnBlock, ResBlock
from cascade_studio.trainers.plan import measure_peak_tensor_bytes

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
RANK = 8


def saved_bytes(fn, params) -> int:
    skip = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def measure(block: nn.Module, inputs: tuple, amp: bool) -> tuple[int, int]:
    """(saved bytes, forward+backward peak bytes) of ``block(*inputs)``."""
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if amp else contextlib.nullcontext
    x = inputs[0]
    grad = torch.randn_like(x)

    def forward():
        with ctx():
            return block(*inputs)

    def step():
        forward().backward(grad)

    saved = saved_bytes(forward, list(block.parameters()))
    step()  # warm-up: lazy initialisations stay out of the measurement
    x.grad = None
    for p in block.parameters():
        p.grad = None
    peak, _ = measure_peak_tensor_bytes(step)
    return saved, peak


def weight_copy_bytes(block: nn.Module, dtype: str, amp: bool) -> int:
    """Autocast over fp32 weights keeps the bf16 cast of every frozen Linear weight for the backward pass (the
    input gradient needs it); the planner counts those from the layout, so they are taken out here."""
    if not (amp and dtype == "fp32"):
        return 0
    return sum(2 * m.weight.numel() for name, m in block.named_modules()
               if isinstance(m, nn.Linear) and not m.weight.requires_grad and ".lora_" not in f".{name}")


def calibrate(dtype: str, amp: bool, width: int, batch: int = 2, side: int = 16) -> dict[str, float]:
    torch.manual_seed(0)
    tdtype = DTYPES[dtype]
    tokens = batch * side * side
    unit = width * tokens
    x = torch.randn(batch, width, side, side, dtype=tdtype, requires_grad=True)
    res = ResBlock(width).to(tdtype).eval().requires_grad_(False)
    res_saved, res_peak = measure(res, (x,), amp)
    copies = weight_copy_bytes(res, dtype, amp)
    res_saved, res_peak = res_saved - copies, res_peak - copies
    results = {"res": res_saved / unit, "res_peak": res_peak / unit}
    for lora in (True, False):
        attn_saved, attn_peak = {}, {}
        for cond_len in (85, 10):
            holder = nn.ModuleDict({"blk": AttnBlock(width, width, 4)}).to(tdtype).eval().requires_grad_(False)
            lora_bytes = 0
            if lora:
                LoraAdapter(LoraSpec(rank=RANK, alpha=RANK, init_weights=False)).attach(holder)
                lora_bytes = (2 if amp else 4) * RANK * (4 * tokens + 2 * batch * cond_len)
            clip = torch.randn(batch, cond_len, width, dtype=tdtype)
            s, p = measure(holder["blk"], (x, clip), amp)
            attn_peak[cond_len] = p - s
            attn_saved[cond_len] = s - weight_copy_bytes(holder["blk"], dtype, amp) - lora_bytes
        # saved = a_img * width * tokens + a_cond * width * batch * cond_len
        a_cond = (attn_saved[85] - attn_saved[10]) / (width * batch * 75)
        a_img = (attn_saved[85] - a_cond * width * batch * 85) / unit
        if lora:
            results.update(attn_image=a_img, attn_cond=a_cond, attn_peak=max(attn_peak.values()) / unit)
        else:
            results.update(attn_image_frozen=a_img, attn_cond_frozen=a_cond)
    return results


def main() -> None:
    torch.set_num_threads(2)
    print("CALIBRATION = {")
    for dtype, amp in (("fp32", False), ("bf16", False), ("bf16", True), ("fp32", True)):
        rows = [calibrate(dtype, amp, width) for width in (128, 256)]
        for row in rows:
            print(f"    # width {128 if row is rows[0] else 256}: " + ", ".join(f"{k}={v:.2f}" for k, v in row.items()))
        mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
        stream = 4 if dtype == "fp32" else 2
        values = ", ".join(f"{k}={v:.1f}" for k, v in mean.items())
        print(f"    ({dtype!r}, {'bf16' if amp else 'no'!r}): Coefficients({values}, stream={stream}, "
              f"weight_copy={dtype == 'fp32' and amp}),")
    print("}")


if __name__ == "__main__":
    main()
