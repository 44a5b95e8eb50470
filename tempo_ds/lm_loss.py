"""``lm_loss="chunked"``: HF causal and masked LMs compute their training loss without materialising logits.

transformers' LM forward computes ``logits = head(hidden)`` [tokens, V] and hands them to the loss, which
upcasts them and keeps the float32 log-softmax for backward: ``4 V`` bytes per token (1002 sbh for a
128k vocabulary at h=512). Here the loss is :func:`tempo_ds.ops.linear_cross_entropy`, which keeps only the
head's input (already kept by the final norm), the labels and a float32 log-sum-exp per token.

How it hooks in -- HF's own forward still runs, argument handling, backbone, MoE router loss and all:

* the head Linear (``lm_head``; BERT's ``cls.predictions.decoder``; RoBERTa's ``lm_head.decoder``) is swapped
  for :class:`LMLossHead`, an ``nn.Linear`` holding the same Parameter objects (tied embeddings, ZeRO-3
  partitions and ``state_dict`` keys survive), which behaves exactly as the Linear unless armed;
* the model gets an instance-level ``forward`` (same signature, ``tempo_ds.revert`` removes it). In training
  mode, with grad enabled and ``labels`` given, it arms the head with the labels and calls the class's forward
  with ``labels=None``; the armed head computes the loss from its input (inside its own module call, so
  ZeRO-3 has gathered the weight) and returns an empty ``[..., 0]`` view of the loss instead of the logits
  (the family's post-processing on it costs nothing). The wrapper adds that placeholder's sum (0) to the
  loss, so the head's output lies on the loss's graph and hooks on it (DeepSpeed ZeRO-3's pre-backward fetch
  of the head's parameters, which also waits for a prefetch in flight) run before the op's backward; it returns
  HF's output with ``loss`` set and ``logits=None``. Every other call (eval, generation,
  no labels, ``logits_to_keep``, inside :func:`full_logits`) is the class's forward, untouched.

HF semantics kept: causal labels are shifted as ``ForCausalLMLoss`` does (pad with ``ignore_index`` then drop
the first; ``shift_labels`` used as given), ``ignore_index`` and ``num_items_in_batch`` read from the forward's
kwargs as ``ForCausalLMLoss`` reads them, Gemma 2/3's ``final_logit_softcapping``, Granite's
``logits_scaling``, Cohere's ``logit_scale``, the MoE models' ``router_aux_loss_coef * aux_loss``; BERT/RoBERTa MLM
use ``CrossEntropyLoss()`` (mean over non-ignored labels, ``num_items_in_batch`` not used, as in HF).

Only forwards tempo_ds has read are rebound: the class's ``forward`` must be one of :data:`CAUSAL` /
:data:`MASKED` (a subclass that overrides it is skipped), the head a plain ``nn.Linear``, and a causal model's
``loss_function`` transformers' ``ForCausalLMLoss``. Anything else is left alone with the reason in the report.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
from dataclasses import dataclass

import torch
from torch import nn

from .ops.linear_cross_entropy import linear_cross_entropy

__all__ = ["LMLossHead", "LMLossPatch", "plan_lm_loss", "full_logits", "CAUSAL", "MASKED", "NOTE"]

_STATE = "_tempo_ds_lm_loss"

# class name -> (transformers module, head path, how the logits are post-processed before the loss)
CAUSAL = {
    "LlamaForCausalLM": ("llama", "lm_head", None), "MistralForCausalLM": ("mistral", "lm_head", None),
    "Qwen2ForCausalLM": ("qwen2", "lm_head", None), "Qwen3ForCausalLM": ("qwen3", "lm_head", None),
    "GemmaForCausalLM": ("gemma", "lm_head", None), "Gemma2ForCausalLM": ("gemma2", "lm_head", "softcap"),
    "Gemma3ForCausalLM": ("gemma3", "lm_head", "softcap"), "MixtralForCausalLM": ("mixtral", "lm_head", None),
    "Phi3ForCausalLM": ("phi3", "lm_head", None), "Olmo2ForCausalLM": ("olmo2", "lm_head", None),
    "GraniteForCausalLM": ("granite", "lm_head", "granite"), "CohereForCausalLM": ("cohere", "lm_head", "cohere"),
    "GPT2LMHeadModel": ("gpt2", "lm_head", None),
    # read and verified the same way, beyond the list
    "Qwen2MoeForCausalLM": ("qwen2_moe", "lm_head", None), "Qwen3MoeForCausalLM": ("qwen3_moe", "lm_head", None),
    "OlmoeForCausalLM": ("olmoe", "lm_head", None), "GraniteMoeForCausalLM": ("granitemoe", "lm_head", "granite"),
    "OlmoForCausalLM": ("olmo", "lm_head", None), "StableLmForCausalLM": ("stablelm", "lm_head", None),
    "PhiForCausalLM": ("phi", "lm_head", None), "Starcoder2ForCausalLM": ("starcoder2", "lm_head", None),
    "OPTForCausalLM": ("opt", "lm_head", None),
}
MASKED = {
    "BertForMaskedLM": ("bert", "cls.predictions.decoder", None),
    "RobertaForMaskedLM": ("roberta", "lm_head.decoder", None),
}
NOTE = ("lm_loss=chunked: in training mode with labels, outputs.logits is None (the loss never materialises "
        "them); use `with tempo_ds.lm_loss.full_logits(model):` for a forward with logits, or lm_loss='off'")


@dataclass
class _Armed:
    """What the model-level forward hands the head for one call."""

    labels: torch.Tensor
    causal: bool
    ignore_index: int = -100
    num_items_in_batch: torch.Tensor | int | None = None
    shift_labels: torch.Tensor | None = None
    softcap: float | None = None
    logit_scale: float | None = None
    loss: torch.Tensor | None = None


class LMLossHead(nn.Linear):
    """The LM head Linear (same Parameter objects); when armed by the model's forward it returns an empty
    ``[..., 0]`` placeholder and leaves the chunked loss in ``armed.loss``. Saved for backward when armed: its
    input, the labels and a float32 log-sum-exp per token (see ``linear_cross_entropy``)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device, dtype)
        self._armed: _Armed | None = None

    @classmethod
    def from_linear(cls, linear: nn.Module) -> "LMLossHead":
        if type(linear) is not nn.Linear:
            raise TypeError(f"the head is {type(linear).__name__}, not nn.Linear")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias = linear.weight, linear.bias  # the Parameter objects themselves (bias may be None)
        new._armed = None
        return new.train(linear.training)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        armed = self._armed
        if armed is None:
            return super().forward(hidden)
        self._armed = None
        if armed.causal:
            labels = armed.shift_labels
            if labels is None:  # as transformers' ForCausalLMLoss: token t predicts label t + 1
                labels = nn.functional.pad(armed.labels, (0, 1), value=armed.ignore_index)[..., 1:]
            num_items = armed.num_items_in_batch
        else:
            labels, num_items = armed.labels, None
        labels = labels.to(hidden.device)
        if labels.shape != hidden.shape[:-1]:
            raise ValueError(f"labels {tuple(labels.shape)} do not match the head's input {tuple(hidden.shape[:-1])}")
        armed.loss = linear_cross_entropy(hidden, self.weight, labels, self.bias, ignore_index=armed.ignore_index,
                                          num_items_in_batch=num_items, softcap=armed.softcap,
                                          logit_scale=armed.logit_scale)
        # The placeholder is an empty view of the loss, and the model's forward adds its sum (0) to the loss: the
        # head's output is then on the loss's graph, so hooks on it run in backward before the op's backward
        # (DeepSpeed ZeRO-3 fetches the head's parameters there, waiting for a prefetch still in flight).
        lead = hidden.shape[:-1]
        return armed.loss.reshape((1,) * (len(lead) + 1)).expand(*lead, 0)


@dataclass
class _Spec:
    class_name: str
    head: str
    causal: bool
    post: str | None
    forward: object                      # the class's forward function
    labels_at: int                       # index of ``labels`` among the positional arguments (after self)
    keep_logits: int = 0                 # > 0 inside full_logits()


@dataclass
class LMLossPatch:
    """The model-level half of ``lm_loss=chunked`` (the head swap is an ordinary ``Swap``): ``apply`` sets the
    instance-level forward, ``undo`` removes it."""

    spec: _Spec
    note: str = NOTE

    def apply(self, model: nn.Module) -> None:
        object.__setattr__(model, _STATE, self.spec)
        object.__setattr__(model, "forward", _InstanceForward(_forward, model))

    def undo(self, model: nn.Module) -> None:
        model.__dict__.pop("forward", None)
        model.__dict__.pop(_STATE, None)


class _InstanceForward(functools.partial):
    """The model's instance-level forward, ``_forward`` with the model bound: a partial of a module-level function
    rather than a bound closure, so that ``torch.save`` / ``pickle`` and ``copy.deepcopy`` of the injected model
    keep it (a bound method pickles as a lookup of ``model.forward``, which finds the class's forward on load), and
    ``torch.export`` reads its code through ``.func``. Its signature is the class forward's without ``self``, so
    HF Trainer's unused-column check sees the model's arguments."""

    def __repr__(self) -> str:  # partial's would print the whole model
        return f"<tempo_ds chunked-loss forward of {type(self.args[0]).__name__}>"

    @property
    def __signature__(self) -> inspect.Signature:
        sig = inspect.signature(self.args[0].__dict__[_STATE].forward)
        return sig.replace(parameters=list(sig.parameters.values())[1:])


def _forward(model: nn.Module, *args, **kwargs):
    spec: _Spec = model.__dict__[_STATE]
    positional = len(args) > spec.labels_at
    labels = args[spec.labels_at] if positional else kwargs.get("labels")
    head = model.get_submodule(spec.head)
    keep = kwargs.get("logits_to_keep", 0)
    if (labels is None or not model.training or not torch.is_grad_enabled() or spec.keep_logits
            or not isinstance(head, LMLossHead) or not (isinstance(keep, int) and keep == 0)):
        return spec.forward(model, *args, **kwargs)
    if positional:
        args = args[:spec.labels_at] + (None,) + args[spec.labels_at + 1:]
    else:
        kwargs["labels"] = None
    return_dict = kwargs.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(model.config, "return_dict", True)
    armed = _Armed(labels, spec.causal)
    if spec.causal:
        armed.ignore_index = kwargs.get("ignore_index", -100)
        armed.num_items_in_batch = kwargs.get("num_items_in_batch")
        armed.shift_labels = kwargs.get("shift_labels")
    if spec.post == "softcap":
        armed.softcap = model.config.final_logit_softcapping
    elif spec.post == "granite":
        armed.logit_scale = 1.0 / model.config.logits_scaling
    elif spec.post == "cohere":
        armed.logit_scale = model.logit_scale
    head._armed = armed
    try:
        out = spec.forward(model, *args, return_dict=True, **kwargs)
    finally:
        head._armed = None
    loss = armed.loss
    if loss is None:
        raise RuntimeError(f"lm_loss=chunked: {spec.class_name}.forward did not call its head {spec.head!r}")
    if torch.is_tensor(out.get("logits")) and out["logits"].requires_grad:
        loss = loss + out["logits"].sum()  # 0: the placeholder, after the family's post-processing (see the head)
    aux = getattr(out, "aux_loss", None)
    if aux is not None and hasattr(model, "router_aux_loss_coef"):
        loss = loss + model.router_aux_loss_coef * aux.to(loss.device)
    fields = {k: v for k, v in out.items() if k not in ("loss", "logits")}
    out = type(out)(loss=loss, **fields)
    return out if return_dict else out.to_tuple()


@contextlib.contextmanager
def full_logits(model: nn.Module):
    """Within this block the model's forward is transformers' own (logits computed and returned, HF's loss),
    also in training mode. A no-op for a model without ``lm_loss=chunked``."""
    spec = model.__dict__.get(_STATE)
    if spec is None:
        yield model
        return
    spec.keep_logits += 1
    try:
        yield model
    finally:
        spec.keep_logits -= 1


def _verified(model: nn.Module):
    """(class name, (module, head path, post), causal) for the first verified class whose forward the model
    runs, or None."""
    forward = type(model).forward
    for klass in type(model).__mro__:
        for table, causal in ((CAUSAL, True), (MASKED, False)):
            entry = table.get(klass.__name__)
            if entry is None:
                continue
            try:
                module = importlib.import_module(f"transformers.models.{entry[0]}.modeling_{entry[0]}")
            except ImportError:
                continue
            original = getattr(forward, "__module__", None) == module.__name__ and \
                getattr(forward, "__qualname__", "").startswith(klass.__name__ + ".")
            if getattr(module, klass.__name__, None) is klass and klass.forward is forward and original:
                return klass.__name__, entry, causal
    return None


def plan_lm_loss(model: nn.Module, cfg, plan, skip=lambda name: False) -> None:
    """Add ``lm_loss=chunked`` to ``plan`` (a ``Swap`` of the head and an :class:`LMLossPatch`), or a ``Skip``
    with the reason; models without an LM head get neither."""
    from .policies import Skip, Swap

    if getattr(cfg, "lm_loss", "off") != "chunked":
        return
    name = type(model).__name__
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if head is None:
        return
    head_name = next((n for n, m in model.named_modules() if m is head), "<lm head>")

    def skipped(reason: str) -> None:
        plan.skips.append(Skip(head_name, type(head).__name__, f"lm_loss=chunked: {reason}"))

    from .liger import forward_reason

    found = _verified(model)
    if found is None and forward_reason(model):
        return skipped(forward_reason(model))
    if found is None:
        return skipped(f"{name}.forward is not one tempo_ds has verified (causal: {', '.join(CAUSAL)}; "
                       f"masked: {', '.join(MASKED)})")
    class_name, (_, path, post), causal = found
    if head_name != path:
        return skipped(f"the output embeddings are at {head_name!r}, {class_name}.forward uses {path!r}")
    if skip(path):
        return skipped("matched a 'skip' pattern")
    if "forward" in model.__dict__:
        return skipped(f"model.forward was already replaced on the instance "
                       f"({getattr(model.forward, '__qualname__', model.forward)!r})")
    if type(head) is not nn.Linear:
        return skipped(f"the head is {type(head).__name__}, not nn.Linear")
    if causal:
        from transformers.loss.loss_utils import ForCausalLMLoss

        if "_loss_function" in model.__dict__ or model.loss_function is not ForCausalLMLoss:
            return skipped(f"model.loss_function is {getattr(model.loss_function, '__name__', model.loss_function)}, "
                           "not transformers' ForCausalLMLoss")
    if any(s.name == path for s in plan.swaps):
        return skipped("another technique already replaces this module")
    params = list(inspect.signature(type(model).forward).parameters)
    if "labels" not in params:
        return skipped(f"{class_name}.forward takes no 'labels' argument")
    spec = _Spec(class_name, path, causal, post, type(model).forward, params.index("labels") - 1)
    plan.swaps.append(Swap(path, head, LMLossHead.from_linear(head), "lm_loss=chunked"))
    plan.patches.append(LMLossPatch(spec))
