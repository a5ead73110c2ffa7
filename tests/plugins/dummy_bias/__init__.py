"""A fourth adapter method that lives only in tests: a learned bias on Stage C's output, per channel.

It proves that a method is one folder: ``config.py`` registers the record, ``method.py`` holds the torch side,
and nothing in ``cascade_studio`` names it. Tests make it known to a fresh process with
``CASCADE_STUDIO_METHODS=dummy_bias.config`` and this folder's parent on ``PYTHONPATH``.
"""
