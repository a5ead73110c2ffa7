"""Drop two import-time notes that bitsandbytes prints on CPUs with AVX512-BF16, where nothing is wrong.

On such CPUs ``import bitsandbytes`` (which ``import peft`` does) asks the ``kernels`` package for an optional
4-bit CPU matmul kernel from the Hugging Face Hub. Offline (every test, CI, many training boxes) that yields a
"publisher trust" warning and a "Failed to load CPU gemm_4bit_forward ... pip install kernels" warning, although
bitsandbytes falls back to its own kernel and the studio only uses it for 8-bit optimizers and
``train.quantize_base``. The filters match those two messages only; every other record passes.
"""
from __future__ import annotations

import logging

_NOTES = {
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward",
    "kernels._internals.hf_hub": "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'",
}


class _DropNote(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def install() -> None:
    """Attach the filters once (idempotent)."""
    for name, prefix in _NOTES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNote) for f in logger.filters):
            logger.addFilter(_DropNote(prefix))
