"""How a tempo_ds op is built, so that it is sound on a GPU we have not run (DESIGN.md section 5, rules 10-13).

Every op is a pair of ``torch.library`` ops (``tempo_ds::<op>_fwd`` and ``tempo_ds::<op>_bwd``), each with a
fake implementation, joined by ``register_autograd``; a thin Python wrapper in front validates arguments and
turns everything that depends on global state into explicit arguments:

* **Autocast** is resolved in the wrapper (:func:`autocast_dtype`) into a ``compute_dtype`` argument; the
  op runs with autocast off and casts inside. Parameters reach the op uncast, as the Parameter objects
  themselves, so ``setup_context`` saves the Parameter (ZeRO-3 rule 7) and the fake implementation knows
  the output dtype without autocast.
* **Randomness** is a seed tensor drawn in the wrapper from the default generator of the input's device
  (:func:`draw_seed`): a device tensor, never read on the host. Every checkpoint flavour restores that
  generator before recomputing, so the recompute draws the same seed.
* **What is saved** depends only on shapes, dtypes and flags the caller passes, never on a device value,
  so a recompute saves the same set (rule 9) and nothing syncs the host (rule 10).
* Under ``no_grad`` autograd does not call ``setup_context``: nothing is saved and rule 4 holds by itself.
* ZeRO-3: the backward gathers partitioned Parameters with ``tempo_ds.ops._zero.gathered``.
* Every kernel module lists the specializations its dispatch launches (``aot_specializations``) for the
  ahead-of-time compile check.

**Triton ops: what torch.compile sees.** An op whose CUDA path launches Triton kernels (GELU, LayerNorm and
RMSNorm, seed dropout, few-bit activations, lean attention, the gated MLP) is registered with
:func:`triton_op`, in two layers:

* ``tempo_ds::<op>_fwd`` / ``_bwd`` (the names autograd, ``torch.export`` and every caller see) is a *triton
  op*: its body ``fn`` is also its fake implementation, and under ``FunctionalTensorMode`` -- AOTAutograd, i.e.
  ``torch.compile`` -- the op decomposes into ``fn``. On CUDA with compiled kernels (:func:`kernels_visible`)
  ``fn`` is the Triton path itself: its tensor allocations, a few aten ops (the norms' column ranking, the
  gated MLP's matmuls) and the launches through ``torch.library.wrap_triton``, which AOTAutograd records as
  ``triton_kernel_wrapper_functional`` nodes that Inductor compiles and schedules with the rest of the graph.
  ``torch.export`` keeps the op whole (a serialisable graph, no Triton source in it).
* Everywhere else ``fn`` calls ``tempo_ds::<op>_fwd_opaque`` / ``_bwd_opaque``, a plain ``custom_op`` holding
  the PyTorch path (and the kernels under Triton's CPU interpreter, ``TEMPO_DS_TRITON=1``) with its own fake
  implementation. It stays opaque on purpose: decomposed, Inductor would refuse the numerics the tests pin
  down (the GELU inverse's fixed operation order, aten's fused LayerNorm kernels, HF's exact gated-MLP
  kernels, dropout's chunked mask) and re-plan the chunked workspaces that bound the backward's temporaries.
  Registering a kernel per device (``register_kernel("cuda", ...)``) would not do: the decomposition under
  ``FunctionalTensorMode`` runs ``fn`` for every device, so ``fn`` has to choose the path itself; and
  interpreted kernels (``InterpretedFunction``) cannot be traced by ``wrap_triton``, so the interpreter's
  launches belong behind the opaque op too.

Both layers choose their path from devices, dtypes, shapes and the environment only, so the fake
implementation (``fn`` on fake tensors) allocates exactly what the real call returns. Host constants of the
kernel path are computed outside any tracing mode (:func:`host_constant`) and small constant tensors are made
per trace, never cached from one (:func:`device_constant`).
"""
from __future__ import annotations

import functools
import os
from typing import Callable, Iterable

import torch

__all__ = ["autocast_dtype", "draw_seed", "no_autocast", "LIB", "triton_op", "kernels_visible", "host_constant",
           "device_constant"]

LIB = "tempo_ds"


def autocast_dtype(t: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast would run a matmul on ``t``'s device in, or None when autocast is off there or leaves
    ``t`` alone (float64, as autocast's casts do)."""
    device = t.device.type
    if not torch.is_autocast_enabled(device) or t.dtype == torch.float64:
        return None
    return torch.get_autocast_dtype(device)


def no_autocast(t: torch.Tensor):
    """Autocast off on ``t``'s device: the op body casts to the ``compute_dtype`` its wrapper resolved itself."""
    return torch.autocast(t.device.type, enabled=False)


def draw_seed(device: torch.device) -> torch.Tensor:
    """A 31-bit seed as a 1-element int64 tensor on ``device``, drawn from that device's default generator."""
    return torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=device)


# -- Triton ops -------------------------------------------------------------------------------------------
def kernels_visible(t: torch.Tensor) -> bool:
    """Whether a triton op's body launches the Triton kernels itself (so ``torch.compile`` sees them): ``t`` is a
    CUDA tensor and the kernels are compiled, not run by Triton's interpreter (``TRITON_INTERPRET=1``)."""
    return t.device.type == "cuda" and os.environ.get("TRITON_INTERPRET") != "1"


def _tracing() -> bool:
    return torch._C._len_torch_dispatch_stack() > 0


def host_constant(fn: Callable) -> Callable:
    """``functools.lru_cache`` for a function that computes a Python number with (CPU) tensors, run outside any
    tracing mode: under fake tensors, functionalization or make_fx a ``.item()`` could not be answered."""
    cached = functools.lru_cache(maxsize=None)(fn)

    @functools.wraps(fn)
    def wrapper(*args):
        if not _tracing():
            return cached(*args)
        from torch.utils._python_dispatch import _disable_current_modes

        with _disable_current_modes():
            return cached(*args)

    wrapper.cache_clear = cached.cache_clear
    return wrapper


_CONSTANTS: dict = {}


def device_constant(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.tensor(values, dtype, device)``, cached per (values, dtype, device) when run eagerly. Under a
    tracing mode it is made afresh (the trace records it as a constant): a cached fake or functional tensor
    would leak into later eager calls, and a cached real one into the trace."""
    values = tuple(values)
    if torch.compiler.is_compiling() or _tracing():
        return torch.tensor(values, dtype=dtype, device=device)
    key = (values, dtype, torch.device(device))
    if key not in _CONSTANTS:
        _CONSTANTS[key] = torch.tensor(values, dtype=dtype, device=device)
    return _CONSTANTS[key]


class _LazyKernels:
    """The JIT functions of a triton op, imported when first asked for (AOTAutograd's cache key reads them)."""

    def __init__(self, kernels: Callable[[], Iterable]):
        self._kernels = kernels

    def __iter__(self):
        try:
            from triton.runtime.jit import JITFunction

            kernels = list(self._kernels())
        except ImportError:
            return iter(())
        return iter([k for k in kernels if isinstance(k, JITFunction)])  # not the interpreter's functions


def triton_op(name: str, *, mutates_args: Iterable[str] = (), kernels: Callable[[], Iterable] | None = None):
    """Decorator: register ``fn`` as the op ``name`` the way ``torch.library.triton_op`` does (module docstring).

    ``fn`` is the eager implementation (its ``wrap_triton`` launches go straight to the kernel), the fake
    implementation, and what the op decomposes into under ``FunctionalTensorMode`` except while
    ``torch.export`` traces. ``kernels`` returns the Triton JIT functions ``fn`` may launch: they enter
    AOTAutograd's cache key, as ``torch.library.triton_op`` finds them by reading ``fn``'s source (which
    cannot follow our calls into ``tempo_ds.kernels``).

    Why not ``torch.library.triton_op`` itself: that source scan imports ``torch._inductor`` (and triton) when
    the op is registered, about a second added to every ``import tempo_ds``; the registration is otherwise the
    same public ``custom_op`` / ``register_fake`` / ``register_torch_dispatch`` calls.
    """
    from torch._library.triton import set_wrap_triton_enabled
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor, FunctionalTensorMode

    def dec(fn: Callable) -> torch.library.CustomOpDef:
        def backend(*args, **kwargs):
            with set_wrap_triton_enabled(False):  # real tensors: launch the kernels, no HOP dispatch
                return fn(*args, **kwargs)

        op = torch.library.custom_op(name, backend, mutates_args=mutates_args,
                                     schema=torch.library.infer_schema(fn, mutates_args=mutates_args))
        op.register_fake(fn)

        def decompose(mode, func, types, args, kwargs):
            from torch.export._trace import custom_triton_ops_decomposition_disabled

            if custom_triton_ops_decomposition_disabled():  # torch.export keeps the op whole
                return mode.__torch_dispatch__(func, types, args, kwargs)
            if any(not issubclass(t, FakeTensor) and t not in (torch.Tensor, FunctionalTensor) for t in types):
                return NotImplemented
            with mode:
                return fn(*args, **kwargs)

        op.register_torch_dispatch(FunctionalTensorMode, decompose)
        if kernels is not None:
            import torch._library.triton as registry

            registry.triton_ops_to_kernels[name] = _LazyKernels(kernels)
        return op

    return dec
