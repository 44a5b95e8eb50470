"""How a tempo_ds op is built, so that it is sound on a GPU we have not run (DESIGN.md section 5, rules 10-13).

Every op is a pair of ``torch.library`` custom ops (``tempo_ds::<op>_fwd`` and ``tempo_ds::<op>_bwd``), each
with a fake implementation, joined by ``register_autograd``; a thin Python wrapper in front validates
arguments and turns everything that depends on global state into explicit arguments:

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
* The CUDA path launches Triton kernels through ``torch.library.wrap_triton`` so Inductor sees them; every
  kernel module lists the specializations its dispatch launches (``aot_specializations``) for the
  ahead-of-time compile check.
"""
from __future__ import annotations

import torch

__all__ = ["autocast_dtype", "draw_seed", "no_autocast", "LIB"]

LIB = "tempo_ds"


def autocast_dtype(t: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast would run a matmul on ``t``'s device in, or None when autocast is off there."""
    device = t.device.type
    if not torch.is_autocast_enabled(device):
        return None
    return torch.get_autocast_dtype(device)


def no_autocast(t: torch.Tensor):
    """Autocast off on ``t``'s device: the op body casts to the ``compute_dtype`` its wrapper resolved itself."""
    return torch.autocast(t.device.type, enabled=False)


def draw_seed(device: torch.device) -> torch.Tensor:
    """A 31-bit seed as a 1-element int64 tensor on ``device``, drawn from that device's default generator."""
    return torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=device)
