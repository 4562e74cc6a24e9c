"""Fused and chunked kernels for training (installed as ``veomni_lightning.kernels``).

Deliberately empty of imports and side effects: run from the repository root, this folder is also reachable as a
top-level ``kernels`` package, which transformers probes for (it looks for Hugging Face's ``kernels`` library).
Importing it must stay harmless and must not look like that library (no ``__version__``). Import the submodules
directly, e.g. ``from veomni_lightning.kernels.cross_entropy import linear_cross_entropy``.
"""
