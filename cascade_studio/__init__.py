"""Cascade Studio: fine-tuning and adapter studio for Stable Cascade's Stage C."""

from . import _quiet

_quiet.install()

__version__ = "0.1.0"
