"""Triton kernels of tempo_ds, one file per op family; installed as ``tempo_ds.kernels``.

This folder is the package ``tempo_ds.kernels`` (see ``package_dir`` in setup.py), never a top-level
module named ``kernels``: that name belongs to another PyPI package that transformers can import.
Kernels run on CUDA, and on the CPU under ``TRITON_INTERPRET=1`` for tests.

Every launcher goes through ``_launch`` (``torch.library.wrap_triton``, seeds as device tensors, the device's
shared-memory limit), and every kernel module lists the specializations its CUDA dispatch launches
(``aot_specializations``, built with ``_spec.spec``) so that ``aot`` (``tempo-ds aot``) compiles them ahead of time
for sm_80 and sm_90 without a GPU.
"""
import importlib.util
import os


def triton_available() -> bool:
    """True when Triton is importable and can run here (a CUDA device, or the interpreter on CPU)."""
    if importlib.util.find_spec("triton") is None:
        return False
    import torch

    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
