"""When an op runs its Triton kernel instead of its PyTorch path."""
from __future__ import annotations

import functools
import importlib.util
import os

import torch


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def use_triton(x: torch.Tensor) -> bool:
    """True for CUDA tensors when Triton is installed, unless ``TEMPO_DS_TRITON=0``.

    ``TEMPO_DS_TRITON=1`` together with ``TRITON_INTERPRET=1`` also sends CPU tensors to the kernels
    (through Triton's interpreter): that is how the tests run the kernels without a GPU.
    """
    flag = os.environ.get("TEMPO_DS_TRITON", "")
    if flag == "0" or not _triton_importable():
        return False
    if x.is_cuda:
        return True
    return flag == "1" and os.environ.get("TRITON_INTERPRET") == "1"
