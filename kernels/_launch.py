"""How every kernel of ``tempo_ds.kernels`` is launched: through ``torch.library.wrap_triton``, with seeds as
device tensors and tiles that fit the device's shared memory.

* :func:`launcher` returns ``wrap_triton(kernel)``: inside the body of a triton op
  (``tempo_ds.ops._library.triton_op``, the ops' CUDA path) ``torch.compile`` records the launch as a
  ``triton_kernel_wrapper_functional`` node, which Inductor compiles and schedules with the rest of the graph;
  in eager (the op's body on real tensors, where ``wrap_triton`` is switched off) it launches the kernel as
  usual. Under ``TRITON_INTERPRET=1`` ``@triton.jit`` makes an ``InterpretedFunction``, which ``wrap_triton``
  cannot trace; it is launched directly (from the ops' opaque custom ops).
* :func:`seed_tensor` turns a dropout seed into the 1-element int64 device tensor the kernels load their seed
  from: the seed stays on the device, so drawing it never syncs the host (DESIGN.md section 5, rule 10). A
  Python int is still accepted (copied to the device).
* :func:`shared_memory_limit` is the per-block shared memory (opt-in maximum) a kernel may use on a device;
  the block-size choices of the kernels take it as an argument, so they stay pure functions that the
  ahead-of-time compile check (``tempo_ds.kernels.aot``) can call with the figure of any target.
  :func:`multiprocessor_count` is the device's SM count (grids sized per SM).
* Both read the driver on a machine with CUDA. Without one, a CUDA launch can still be *traced* (fake CUDA
  tensors: ``torch.compile``/``make_fx`` of the CUDA path on a CPU-only host, as ``tests/test_triton_op.py``
  does); the launch then takes the figures of ``TRACE_ARCH`` (an H100/H200, sm_90).
"""
from __future__ import annotations

import functools

import torch

__all__ = ["SHARED_MEMORY", "launcher", "multiprocessor_count", "seed_tensor", "shared_memory_limit"]

# Per-block shared memory (opt-in maximum, bytes) by compute capability: what a kernel may ask for.
SHARED_MEMORY = {75: 65536, 80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448}
# The CPU interpreter has no limit of its own; it runs the tiles an A100 (sm_80) would, so the tests run
# the tile sizes of the CUDA path.
INTERPRETER_ARCH = 80
# A CUDA launch traced on a host without CUDA (fake tensors) is sized for this target: sm_90, 132 SMs.
TRACE_ARCH, TRACE_MULTIPROCESSORS = 90, 132


def launcher(kernel):
    """``kernel`` wrapped by ``torch.library.wrap_triton`` (launch it as ``launcher(kernel)[grid](...)``) while a
    graph is traced; in eager (inside a triton op's body, where ``wrap_triton`` is switched off) the kernel
    launched on its tensors' device; the kernel itself when it runs in Triton's interpreter or this torch has no
    ``wrap_triton``."""
    from triton.runtime.jit import JITFunction

    wrap = getattr(torch.library, "wrap_triton", None)
    if wrap is None or not isinstance(kernel, JITFunction):
        return kernel
    from torch._library.triton import is_wrap_triton_enabled

    return wrap(kernel) if is_wrap_triton_enabled() else _OnTensorsDevice(kernel)


class _OnTensorsDevice:
    """A kernel launched on the device of its first CUDA tensor argument. Triton launches on the current CUDA
    device, which is the tensors' under DeepSpeed (one device per rank) but not for a model spread over several
    devices in one process; compiled graphs get this guard from Inductor."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            device = next((a.device for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.is_cuda),
                          None)
            if device is None or device.index == torch.cuda.current_device():
                return launch(*args, **kwargs)
            with torch.cuda.device(device):
                return launch(*args, **kwargs)
        return run


def seed_tensor(seed, device: torch.device) -> torch.Tensor:
    """The seed as a 1-element int64 tensor on ``device``: a device tensor from ``tempo_ds.ops._library.draw_seed``
    as it is (never read on the host), a Python int in [0, 2**31) copied there."""
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or seed.numel() != 1:
            raise ValueError(f"a seed tensor must hold one int64 element; got dtype={seed.dtype}, "
                             f"shape={tuple(seed.shape)}")
        if seed.device != torch.device(device):
            raise ValueError(f"the seed tensor is on {seed.device} but the data is on {device}: draw it with "
                             "tempo_ds.ops._library.draw_seed(device)")
        return seed.reshape(1)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31:
        raise ValueError(f"seed={seed!r} must be an int in [0, 2**31) or a 1-element int64 device tensor")
    return torch.tensor([seed], dtype=torch.int64, device=device)


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.lru_cache(maxsize=None)
def _cuda_shared_memory(index: int) -> int:
    try:
        import triton

        return int(triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"])
    except Exception:  # an older triton: the non-opt-in figure is a safe lower bound
        return int(torch.cuda.get_device_properties(index).shared_memory_per_block)


def shared_memory_limit(device: torch.device) -> int:
    """Shared memory (bytes) one program may use on ``device``: the opt-in maximum of a CUDA device, read from
    the driver; sm_80's for the CPU interpreter."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return SHARED_MEMORY[TRACE_ARCH]
        return _cuda_shared_memory(_index(device))
    return SHARED_MEMORY[INTERPRETER_ARCH]


def multiprocessor_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA ``device`` (``TRACE_MULTIPROCESSORS`` where CUDA is absent)."""
    device = torch.device(device)
    if not torch.cuda.is_available():
        return TRACE_MULTIPROCESSORS
    return torch.cuda.get_device_properties(_index(device)).multi_processor_count
