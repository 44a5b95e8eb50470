"""What a kernel module lists for the ahead-of-time compile check: one dict per specialization it launches.

Every ``kernels/<op>.py`` exposes ``aot_specializations(full=False, arch=90) -> list[dict]``; each dict is built
by :func:`spec`::

    {"name": "attention.fwd[bf16,d128,mask=add,dropout]",   unique, readable
     "fn": <the @triton.jit kernel>,
     "signature": {"Q": "*bf16", ..., "sqd": "constexpr", "BLOCK_M": "constexpr"},   every argument, in order
     "constexprs": {"sqd": 1, "BLOCK_M": 64, ...},
     "options": {"num_warps": 4, "num_stages": 2},           launch options (shared memory depends on them)
     "divisible_by_16": ("sqm", ...)}                        integer arguments the launch passes as multiples of 16

Triton specializes a launch on its arguments: an integer equal to 1 becomes a constant, and pointers and
integers divisible by 16 are marked so (vector loads). A specialization therefore lists unit strides as
constexprs equal to 1 and names the integers that are multiples of 16; ``tempo_ds.kernels.aot`` marks every
pointer 16-byte aligned (as PyTorch's allocations are). The block sizes come from the same functions the
launchers call, never from a copy of their constants.
"""
from __future__ import annotations

import inspect

import torch

__all__ = ["POINTER", "spec"]

# torch dtype -> Triton pointer type
POINTER = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.int8: "*i8",
           torch.uint8: "*u8", torch.int64: "*i64", torch.int32: "*i32"}
SHORT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _constexpr_args(fn) -> set[str]:
    """Arguments annotated ``tl.constexpr`` (a JITFunction and an interpreted one both keep ``fn.fn``)."""
    names = set()
    for name, param in inspect.signature(fn.fn).parameters.items():
        ann = param.annotation
        if ann is not inspect.Parameter.empty and ("constexpr" in ann if isinstance(ann, str)
                                                   else "constexpr" in getattr(ann, "__name__", str(ann))):
            names.add(name)
    return names


def spec(name: str, fn, types: dict[str, str], constexprs: dict, *, num_warps: int = 4, num_stages: int = 3,
         divisible_by_16: tuple[str, ...] = ()) -> dict:
    """One specialization of ``fn``: ``types`` gives the Triton type of every runtime argument, ``constexprs`` the
    value of every ``tl.constexpr`` argument and of the integers the launch fixes to 1 (unit strides)."""
    declared = _constexpr_args(fn)
    signature = {}
    for arg in fn.arg_names:
        if arg in declared or arg in constexprs:
            if arg not in constexprs:
                raise ValueError(f"{name}: constexpr argument {arg!r} of {fn.fn.__name__} has no value")
            signature[arg] = "constexpr"
        elif arg in types:
            signature[arg] = types[arg]
        else:
            raise ValueError(f"{name}: argument {arg!r} of {fn.fn.__name__} has no type")
    extra = (set(types) | set(constexprs)) - set(fn.arg_names)
    if extra:
        raise ValueError(f"{name}: {sorted(extra)} are not arguments of {fn.fn.__name__}")
    return {"name": name, "fn": fn, "signature": signature, "constexprs": dict(constexprs),
            "options": {"num_warps": num_warps, "num_stages": num_stages},
            "divisible_by_16": tuple(a for a in divisible_by_16 if signature.get(a, "").startswith("i"))}
