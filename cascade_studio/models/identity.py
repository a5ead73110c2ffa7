"""Which base an adapter was trained on, told by the weights themselves.

An adapter records the fingerprint of the Stage C it was trained on; loading it on a base with another fingerprint
is refused (``--force`` overrides). The fingerprint must not depend on where the weights came from (a repo id names
lite and big alike; the same file can sit in two folders) nor on how they are held: training runs the base in bf16
on a GPU, generation in fp32 on a CPU. So it hashes every tensor's name and shape plus a fixed strided sample of
its values rounded to bfloat16 (exact for bf16 weights, and the same rounding a bf16 run applies to fp32 ones).
Fine-tuning moves nearly every value, so the samples tell two fine-tunes of one architecture apart; the tiny
preset's seeded random init and the toy preset's shipped weights get different fingerprints too.

Computed once per loaded base, before quantization or adapters change its modules: a few dozen values per
tensor, gathered on the device and read to the host in one transfer.
"""
from __future__ import annotations

import hashlib

import torch
from torch import nn

__all__ = ["FINGERPRINT_PREFIX", "SAMPLES_PER_TENSOR", "weights_identity", "comparable"]

FINGERPRINT_PREFIX = "w1-"  # the scheme's version: fingerprints of other schemes are never compared with these
SAMPLES_PER_TENSOR = 64


def weights_identity(module: nn.Module) -> str:
    """``w1-<16 hex>`` for a module's weights; ``meta`` when they have no values (the meta device)."""
    hasher = hashlib.sha256()
    samples = []
    for name, tensor in sorted(module.state_dict().items()):
        hasher.update(f"{name}:{tuple(tensor.shape)};".encode())
        if tensor.is_meta:
            return "meta"
        if not tensor.is_floating_point() or tensor.numel() == 0:
            continue
        flat = tensor.detach().reshape(-1)
        count = min(SAMPLES_PER_TENSOR, flat.numel())
        index = torch.linspace(0, flat.numel() - 1, count, device=flat.device).round().long()
        samples.append(flat[index].to(torch.bfloat16).view(torch.int16))
    if samples:
        hasher.update(torch.cat(samples).cpu().numpy().tobytes())
    return FINGERPRINT_PREFIX + hasher.hexdigest()[:16]


def comparable(a: str | None, b: str | None) -> bool:
    """Both fingerprints come from this scheme (older files and hand-made contexts carry other strings)."""
    return bool(a and b and a.startswith(FINGERPRINT_PREFIX) and b.startswith(FINGERPRINT_PREFIX))
