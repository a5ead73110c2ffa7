"""Cascade Studio: fine-tuning and adapter studio for Stable Cascade's Stage C."""

__version__ = "0.1.0"
