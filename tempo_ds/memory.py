"""The activation-memory meter: count the bytes autograd keeps for backward.

``SavedTensorMeter`` hooks ``torch.autograd.graph.saved_tensors_hooks`` for the duration of a forward
pass and records every tensor autograd saves, with three rules that make the figure mean "activation
memory":

* **de-duplicated by storage** - a tensor saved by two ops, or two views of one storage, count once,
  and a saved view keeps (and is charged for) its whole storage;
* **parameters excluded** - a Parameter, a view of one, or an autocast copy of one is not an
  activation; neither are the model's buffers;
* **attributed** to the module that was running when the storage was first saved (``by_module``),
  to its transformer layer (``per_layer``) and to the autograd op that saved it (``by_op``), read off
  the graph after the forward pass.

The meter never keeps a saved tensor alive: the pack hook wraps the tensor in a small holder that
autograd owns, and the meter keeps only a weak reference to that holder. When autograd frees the
graph, the holders die and the live count drops; ``peak_bytes`` remembers the high-water mark.

Usage::

    with SavedTensorMeter(model) as meter:
        loss = model(**batch).loss
    meter.total_bytes, meter.by_module, meter.per_layer
    loss.backward()
"""
from __future__ import annotations

import weakref
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn

__all__ = ["SavedTensorMeter", "SavedRecord", "find_layers"]

ROOT = "<root>"
OUTSIDE = "<outside>"
UNLABELLED = "<unlabelled>"

# Backward nodes that only view or cast their single input: a tensor whose producer chain is made of
# these and ends at a Parameter is a parameter (e.g. autocast's bf16 copy of a weight, or its transpose).
_PARAM_PASSTHROUGH = {
    "ToCopyBackward0", "TBackward0", "TransposeBackward0", "ViewBackward0", "UnsafeViewBackward0",
    "PermuteBackward0", "ExpandBackward0", "AliasBackward0", "ReshapeAliasBackward0",
}


@dataclass
class SavedRecord:
    """One storage autograd keeps for backward, alive from clock ``born`` to clock ``died``."""

    nbytes: int
    module: str
    dtype: torch.dtype
    shape: tuple
    first_seq: int
    born: int
    died: int | None = None
    op: str | None = None
    holders: int = 0

    def alive_at(self, clock: int) -> bool:
        return self.born <= clock and (self.died is None or self.died > clock)


class _Holder:
    """What autograd stores instead of the tensor; owned by autograd, weakly referenced by the meter."""

    __slots__ = ("tensor", "key", "seq", "__weakref__")

    def __init__(self, tensor: torch.Tensor, key: tuple, seq: int):
        self.tensor = tensor
        self.key = key
        self.seq = seq


def _storage_key(t: torch.Tensor) -> tuple[tuple, int]:
    try:
        storage = t.untyped_storage()
        return (str(t.device), storage.data_ptr(), storage.nbytes()), storage.nbytes()
    except (RuntimeError, NotImplementedError):  # tensors without a plain storage
        nbytes = t.numel() * t.element_size()
        return (str(t.device), id(t), nbytes), nbytes


def find_layers(model: nn.Module) -> tuple[str, int]:
    """Return ``(prefix, count)`` of the model's transformer layers: its largest ModuleList of one class that
    does not sit inside another such list (StableLM's per-head q/k norm lists inside each layer are not the
    layers, however many heads there are)."""
    lists = [(name, len(module)) for name, module in model.named_modules()
             if isinstance(module, nn.ModuleList) and len(module) and len({type(child) for child in module}) == 1]
    outer = [(name, n) for name, n in lists
             if not any(other != name and (other == "" or name.startswith(other + ".")) for other, _ in lists)]
    return max(outer, key=lambda item: item[1], default=("", 0))


def _tensors_in(obj: Any) -> Iterable[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors_in(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors_in(value)


class SavedTensorMeter:
    """Context manager that counts the bytes autograd saves for backward during a forward pass.

    ``model`` (optional) supplies module names for attribution, the parameters and buffers to exclude,
    the transformer layers for ``per_layer``, and the outputs whose graph labels each record with the
    op that saved it. Without a model every byte is counted and attributed to ``"<outside>"``.
    """

    def __init__(self, model: nn.Module | None = None):
        self.model = model
        self.live_bytes = 0
        self.peak_bytes = 0
        self._live: dict[tuple, SavedRecord] = {}
        self._all: list[SavedRecord] = []
        self._refs: dict[weakref.ref, tuple] = {}
        self._clock = 0
        self._peak_clock = 0
        self._measured_clock: int | None = None
        self._seq = 0
        self._stack: list[str] = []
        self._handles: list = []
        self._static_keys: set = set()
        self._outputs: list = []
        self._hooks = None
        self._labelling: str | None = None

    # -- context manager -------------------------------------------------------------------------
    def __enter__(self) -> "SavedTensorMeter":
        if self.model is not None:
            for tensor in list(self.model.parameters()) + list(self.model.buffers()):
                if tensor.numel():
                    self._static_keys.add(_storage_key(tensor)[0])
            for name, module in self.model.named_modules():
                self._handles.append(module.register_forward_pre_hook(self._enter_module(name or ROOT)))
                self._handles.append(module.register_forward_hook(self._leave_module, always_call=True))
            self._handles.append(self.model.register_forward_hook(self._keep_outputs, always_call=True))
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._stack.clear()
        # What autograd keeps at the end of the forward; if a backward inside the block already freed
        # it, fall back to the high-water mark.
        self._measured_clock = self._clock if self.live_bytes else self._peak_clock
        self._label_ops()
        self._outputs.clear()

    # -- module attribution ----------------------------------------------------------------------
    def _enter_module(self, name: str):
        def hook(module, args):
            self._stack.append(name)
        return hook

    def _leave_module(self, module, args, output):
        if self._stack:
            self._stack.pop()

    def _keep_outputs(self, module, args, output):
        self._outputs.extend(t for t in _tensors_in(output) if t.grad_fn is not None)

    # -- saved-tensor hooks ----------------------------------------------------------------------
    def _is_parameter(self, t: torch.Tensor, key: tuple) -> bool:
        if isinstance(t, nn.Parameter) or isinstance(t._base, nn.Parameter) or key in self._static_keys:
            return True
        fn = t.grad_fn
        while fn is not None and fn.name() in _PARAM_PASSTHROUGH and fn.next_functions:
            fn = fn.next_functions[0][0]
            if fn is not None and fn.name() == "torch::autograd::AccumulateGrad":
                return isinstance(fn.variable, nn.Parameter)
        return False

    def _pack(self, t: torch.Tensor):
        key, nbytes = _storage_key(t)
        if self._is_parameter(t, key):
            return t
        self._seq += 1
        # A detached alias: same storage, but no path back to the graph (holding ``t`` itself would make a
        # reference cycle tensor -> grad_fn -> holder -> tensor when autograd saves an op's output).
        holder = _Holder(t.detach(), key, self._seq)
        record = self._live.get(key)
        if record is None:
            self._clock += 1
            module = self._stack[-1] if self._stack else OUTSIDE
            record = SavedRecord(nbytes, module, t.dtype, tuple(t.shape), self._seq, self._clock)
            self._live[key] = record
            self._all.append(record)
            self.live_bytes += nbytes
            if self.live_bytes > self.peak_bytes:
                self.peak_bytes, self._peak_clock = self.live_bytes, self._clock
        record.holders += 1
        self._refs[weakref.ref(holder, self._release)] = key
        return holder

    def _unpack(self, holder):
        if not isinstance(holder, _Holder):
            return holder
        if self._labelling is not None:
            record = self._live.get(holder.key)
            if record is not None and record.first_seq == holder.seq:
                record.op = self._labelling
        return holder.tensor

    def _release(self, ref: weakref.ref) -> None:
        key = self._refs.pop(ref)
        record = self._live[key]
        record.holders -= 1
        if record.holders == 0:
            self._clock += 1
            record.died = self._clock
            del self._live[key]
            self.live_bytes -= record.nbytes

    # -- op labels ---------------------------------------------------------------------------------
    def _label_ops(self) -> None:
        """Walk the graph from the model outputs and label each record with the op that saved it."""
        seen = set()
        stack = [t.grad_fn for t in self._outputs]
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            self._labelling = node.name()
            try:
                names = [n for n in dir(node) if n.startswith("_saved_")]
                if hasattr(node, "saved_tensors"):
                    names.append("saved_tensors")
                for name in names:
                    try:
                        getattr(node, name)
                    except RuntimeError:  # freed by a backward inside the block
                        pass
            finally:
                self._labelling = None
            stack.extend(fn for fn, _ in node.next_functions)

    # -- results -----------------------------------------------------------------------------------
    @property
    def saved(self) -> list[SavedRecord]:
        """The records counted: live at the end of the forward pass, in the order they were saved."""
        clock = self._clock if self._measured_clock is None else self._measured_clock
        return [r for r in self._all if r.alive_at(clock)]

    @property
    def total_bytes(self) -> int:
        return sum(r.nbytes for r in self.saved)

    def _grouped(self, key) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for record in self.saved:
            out[key(record)] += record.nbytes
        return dict(out)

    @property
    def by_module(self) -> dict[str, int]:
        """Bytes per innermost running module (the first module that saved each storage)."""
        return self._grouped(lambda r: r.module)

    @property
    def by_op(self) -> dict[str, int]:
        """Bytes per autograd node that saved each storage first (``<unlabelled>`` if not reachable)."""
        return self._grouped(lambda r: r.op or UNLABELLED)

    @property
    def by_dtype(self) -> dict[str, int]:
        return self._grouped(lambda r: str(r.dtype).replace("torch.", ""))

    def layer_of(self, module: str) -> int | None:
        """Index of the transformer layer that ``module`` belongs to, or None."""
        prefix, count = self.layers
        if not count:
            return None
        head = prefix + "." if prefix else ""
        if not module.startswith(head):
            return None
        index = module[len(head):].split(".", 1)[0]
        return int(index) if index.isdigit() and int(index) < count else None

    @property
    def layers(self) -> tuple[str, int]:
        if self.model is None:
            return ("", 0)
        if not hasattr(self, "_layers"):
            self._layers = find_layers(self.model)
        return self._layers

    @property
    def per_layer(self) -> list[int]:
        """Bytes saved inside each transformer layer, in layer order (empty without layers)."""
        out = [0] * self.layers[1]
        for record in self.saved:
            index = self.layer_of(record.module)
            if index is not None:
                out[index] += record.nbytes
        return out

    def layer_records(self, index: int) -> list[SavedRecord]:
        return [r for r in self.saved if self.layer_of(r.module) == index]

    def table(self, records: Iterable[SavedRecord] | None = None) -> str:
        """A readable table of records (default: all counted) with module, op, dtype, shape, bytes."""
        rows = list(self.saved if records is None else records)
        lines = [f"{'module':<48} {'op':<28} {'dtype':<9} {'shape':<24} {'bytes':>12}"]
        for r in rows:
            lines.append(f"{r.module[-48:]:<48} {(r.op or UNLABELLED)[:28]:<28} "
                         f"{str(r.dtype).replace('torch.', ''):<9} {str(list(r.shape))[:24]:<24} {r.nbytes:>12,}")
        lines.append(f"{'total':<112}{sum(r.nbytes for r in rows):>12,}")
        return "\n".join(lines)
