"""One tensor derived from a mask, shared by every layer of a forward pass.

An attention keeps its mask for backward by reference, so layers that each derive their own copy of the mask
(a boolean row, an inversion) keep one copy per layer. :class:`SharedDerived` hands every caller the same
derived tensor while the source is the same, unmodified tensor - decided from identity and the version
counter, never from values (nothing is read on the host) - so the copy is kept, and charged by the meter,
once. It holds the source by weak reference and drops the derived tensor when the source dies.
"""
from __future__ import annotations

import weakref
from typing import Callable

import torch


class SharedDerived:
    """``derive(source)`` computed once per source tensor (see the module docstring); under ``torch.compile``
    it is computed at each call (the compiler sees one graph and shares it itself). Pickles and deep-copies
    empty (a weak reference cannot be pickled)."""

    def __init__(self):
        self._source = None  # weak reference to the last source
        self._version = -1
        self._value = None

    def __reduce__(self):
        return (type(self), ())

    def _forget(self, source: weakref.ref) -> None:
        if self._source is source:
            self._source, self._version, self._value = None, -1, None

    def __call__(self, source: torch.Tensor, derive: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return derive(source)
        if self._source is not None and self._source() is source and self._version == source._version:
            return self._value
        value = derive(source)
        self._source, self._version, self._value = weakref.ref(source, self._forget), source._version, value
        return value
