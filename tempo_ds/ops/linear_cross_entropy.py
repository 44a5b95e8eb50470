"""LM head + cross-entropy that keeps no ``[tokens, vocabulary]`` tensor for backward (exact).

Forward, for ``N`` tokens with hidden states ``h`` [N, H], head weight ``W`` [V, H], optional bias ``b`` [V] and
labels ``y`` [N]; the logits are computed tile by tile (token chunk x vocabulary block) and never stored whole::

    z   = h @ W^T + b                       (in the matmul dtype, like nn.Linear, then float32)
    z   = s * z                             (logit_scale s: Cohere's logit_scale, 1 / Granite's logits_scaling)
    z   = c * tanh(z / c)                   (softcap c: Gemma 2's final_logit_softcapping)
    lse = log(sum_v exp(z_v))               (online over vocabulary blocks: logaddexp of each block's logsumexp)
    loss_i = lse_i - z_{i, y_i}, or 0 where y_i == ignore_index

Backward (``g_i`` the gradient of ``loss_i``, zero for ignored tokens; each tile's logits recomputed)::

    dz  = (softmax(z) - onehot(y)) * g      softmax(z) = exp(z - lse), from the saved lse
    dz  = dz * (1 - tanh(z_s / c)^2) * s    through the softcap and the scale
    dh  = dz @ W        dW = dz^T @ h        db = sum_i dz

Saved for backward: ``h`` itself (in a model, the final norm's output, which that norm keeps anyway), the
weight and bias Parameter objects, the labels and one float32 log-sum-exp per token: ``4 N`` bytes beyond
what the model keeps already, instead of PyTorch's ``4 N V`` bytes of float32 log-softmax.

Cost: one extra logits matmul (the recompute in backward), i.e. 4 instead of 3 ``N x H x V`` matmuls, but no
``[N, V]`` tensor allocated, written and read back whole: on CPU (one thread) the head + loss take 0.5-0.9x the
CPU time of ``F.linear`` + ``F.cross_entropy`` (about 1x at ``H = 1024``, where the fourth matmul weighs most;
``tests/scripts/lm_loss_speed.py``).

Tiles: a tile is ``rows x cols`` logits in the matmul (compute) dtype, written by ``mm``/``addmm`` into one
workspace that every tile of a pass reuses: at most ``TILE_BYTES`` = 16 MiB (2^23 bf16 logits, 2^22 float32)
with at least ``MIN_COLS`` = 4096 vocabulary columns (or the whole vocabulary), then evened out into equal blocks
(:func:`tile_shape`). All tokens make one chunk while ``N x MIN_COLS`` fits, and the vocabulary is cut into as
few blocks as fit: the whole problem is one tile when it fits (BERT-Large's 1024 tokens x 8192 in bf16),
BERT-tiny's 2048 x 8192 is two blocks of 4096 columns, Llama-3's 512 x 128256 eight of 16032. The elementwise
work (float32 upcast, scale, softcap, softmax, the gradient) runs over row sub-blocks of the tile of at most
``SUB_ELEMENTS`` float32 values -- 2^18 (1 MiB) on CPU, so that its five or six passes stay in a core's L2
cache, 2^22 (16 MiB) on other devices -- in one reused float32 workspace (two in a softcap's backward); the
gradient goes back into the tile, rounded to the compute dtype, for the two matmuls.
Transient bytes of a pass (none kept for backward): the tile (<= 16 MiB), the sub-block workspaces (<= 2 MiB on
CPU), compute-dtype copies of ``h`` and of one vocabulary block of ``W`` where they are not in that dtype
(autocast), a few ``N``-element vectors; in backward also the ``cols x H`` matmul result for a block of ``dW``
when ``W`` is not in the compute dtype, with several vocabulary blocks a float32 ``N x H`` ``dh`` accumulator
(plus a ``rows x H`` compute-dtype buffer), with several token chunks a float32 ``cols x H`` ``dW`` accumulator.
Why these sizes (CPU, measured): glibc serves a repeated allocation of up to 32 MiB from its heap once one was
freed, while larger ones are fresh ``mmap``s whose page faults cost as much as the matmul at ``H = 128`` (a 32 MiB
tile made BERT-tiny's head + loss 1.7x slower); thinner tiles make thinner, slower matmuls; separate passes over
a tile in main memory (or one mixed-dtype op) cost 2-6x the same passes over an L2-resident sub-block.
The backward loops over vocabulary blocks outermost: each block of ``dW`` is one matmul over the whole token
chunk (rounded once, as autograd's ``dW`` is); with several token chunks the block is accumulated in float32.
``dh`` is one matmul when the vocabulary is one block, else accumulated in float32 over blocks and rounded once.
Every tile size gives the same loss and gradients up to rounding order; the saved set does not depend on it.

Precision: the logits are rounded to the matmul dtype (as ``nn.Linear``'s output is), then everything runs in
float32 (float64 for float64 inputs): scale, softcap and softmax are never rounded to bf16, so a bf16 model
errs less than HF's, which applies them in bf16.

A label outside ``[0, V)`` that is not ``ignore_index`` gives a NaN loss for its token (PyTorch raises, which
needs a host sync; this op never reads a device value on the host).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ._library import autocast_dtype, no_autocast
from ._zero import gathered, held_parameters, hold_parameters

__all__ = ["linear_cross_entropy", "tile_shape", "sub_rows", "TILE_BYTES", "MIN_COLS", "SUB_ELEMENTS", "REDUCTIONS"]

TILE_BYTES = 16 << 20
MIN_COLS = 4096
SUB_ELEMENTS = {"cpu": 1 << 18}  # float32 sub-block: 1 MiB, stays in a core's L2 cache
SUB_ELEMENTS_OTHER = 1 << 22     # elsewhere (GPU): 16 MiB, few launches
REDUCTIONS = ("mean", "sum", "none")


def tile_shape(n_tokens: int, vocab: int, rows: int | None = None, cols: int | None = None,
               itemsize: int = 4) -> tuple[int, int]:
    """``(rows, cols)`` of the logits tiles for ``n_tokens`` x ``vocab`` in a dtype of ``itemsize`` bytes (the
    compute dtype's): explicit values win, else at most ``TILE_BYTES`` per tile with at least ``MIN_COLS`` columns
    (or the whole vocabulary) -- the whole problem in one tile when it fits -- then evened out into blocks of
    equal size (never wider, so never over the budget; at least half as wide)."""
    n_tokens, vocab = max(n_tokens, 1), max(vocab, 1)
    budget = max(1, TILE_BYTES // itemsize)
    if not cols:
        cols = min(vocab, max(MIN_COLS, budget // n_tokens))
        cols = -(-vocab // -(-vocab // cols))  # as many blocks, all of the same width
    if not rows:
        rows = min(n_tokens, max(1, budget // cols))
        rows = -(-n_tokens // -(-n_tokens // rows))
    return max(1, min(rows, n_tokens)), max(1, min(cols, vocab))


def sub_rows(device: torch.device, rows: int, cols: int) -> int:
    """Rows of the float32 sub-blocks the elementwise work of a ``rows x cols`` tile runs in on ``device``."""
    elements = SUB_ELEMENTS.get(torch.device(device).type, SUB_ELEMENTS_OTHER)
    return max(1, min(rows, elements // max(cols, 1)))


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _view(buf: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A contiguous ``rows x cols`` view of the start of the workspace ``buf`` (out= targets must be contiguous)."""
    return buf.view(-1)[: rows * cols].view(rows, cols)


class _Tiles:
    """The loop both passes share: vocabulary blocks outermost, token chunks, and the matmul of each tile into one
    reused compute-dtype workspace. Yields ``(c0, c1, r0, r1, z)`` with ``z`` the tile's logits before scale and
    softcap, rounded to the compute dtype as ``nn.Linear``'s output is (``addmm`` when there is a bias, like
    ``F.linear``)."""

    def __init__(self, hidden, weight, bias, compute, rows, cols):
        self.n, self.vocab = hidden.shape[0], weight.shape[0]
        self.rows, self.cols = max(1, min(rows, self.n)), max(1, min(cols, self.vocab))  # an empty batch: no tile
        self.h = hidden.to(compute)
        self.weight, self.bias, self.compute = weight, bias, compute
        self.tile = hidden.new_empty(self.rows * self.cols, dtype=compute)

    def blocks(self):
        for c0 in range(0, self.vocab, self.cols):
            c1 = min(c0 + self.cols, self.vocab)
            w = self.weight[c0:c1].to(self.compute)
            b = None if self.bias is None else self.bias[c0:c1].to(self.compute)
            yield c0, c1, w, b

    def chunks(self, w, b):
        for r0 in range(0, self.n, self.rows):
            r1 = min(r0 + self.rows, self.n)
            z = _view(self.tile, r1 - r0, w.shape[0])
            if b is None:
                torch.mm(self.h[r0:r1], w.t(), out=z)
            else:
                torch.addmm(b, self.h[r0:r1], w.t(), out=z)
            yield r0, r1, z


def _label_column(labels: torch.Tensor, c0: int, c1: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(whether each label falls in columns [c0, c1), its column inside the block clamped into range [N, 1])."""
    inside = (labels >= c0) & (labels < c1)
    return inside, (labels - c0).clamp(0, c1 - c0 - 1).unsqueeze(1)


@torch.library.custom_op("tempo_ds::linear_cross_entropy_fwd", mutates_args=())
def _forward(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
             ignore_index: int, softcap: Optional[float], scale: Optional[float],
             compute_dtype: Optional[torch.dtype], rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token loss [N], log-sum-exp [N]), both float32 (float64 for float64 compute)."""
    compute = compute_dtype or hidden.dtype
    acc = _acc(compute)
    n, vocab = hidden.shape[0], weight.shape[0]
    lse = hidden.new_empty((n,), dtype=acc)
    target = hidden.new_zeros((n,), dtype=acc)
    with no_autocast(hidden):
        tiles = _Tiles(hidden, weight, bias, compute, rows, cols)
        sub = sub_rows(hidden.device, tiles.rows, tiles.cols)
        ws = None if compute == acc else hidden.new_empty(sub * tiles.cols, dtype=acc)
        plain = scale is None and softcap is None
        for c0, c1, w, b in tiles.blocks():
            inside, col = _label_column(labels, c0, c1)
            for r0, r1, z in tiles.chunks(w, b):
                if plain:  # the target logits straight from the tile: float32 of them is exact
                    target[r0:r1] += torch.where(inside[r0:r1], z.gather(1, col[r0:r1]).squeeze(1).to(acc), 0)
                for s0 in range(r0, r1, sub):
                    s1 = min(s0 + sub, r1)
                    f = z[s0 - r0:s1 - r0]
                    if ws is not None:  # float32 copy of the sub-block (in cache), the tile stays as computed
                        f = _view(ws, s1 - s0, c1 - c0).copy_(f)
                    if scale is not None:
                        f.mul_(scale)
                    if softcap is not None:
                        f.div_(softcap).tanh_().mul_(softcap)
                    if not plain:
                        target[s0:s1] += torch.where(inside[s0:s1], f.gather(1, col[s0:s1]).squeeze(1), 0)
                    m = f.amax(1)
                    f.sub_(m.unsqueeze(1)).exp_()
                    if c0 == 0:
                        torch.sum(f, 1, out=lse[s0:s1]).log_().add_(m)
                    else:
                        torch.logaddexp(lse[s0:s1], f.sum(1).log_().add_(m), out=lse[s0:s1])
    valid = labels != ignore_index
    in_range = (labels >= 0) & (labels < vocab)
    loss = torch.where(valid, torch.where(in_range, lse - target, float("nan")), 0).to(acc)
    return loss, lse


@_forward.register_fake
def _(hidden, weight, bias, labels, ignore_index, softcap, scale, compute_dtype, rows, cols):
    acc = _acc(compute_dtype or hidden.dtype)
    return hidden.new_empty(hidden.shape[:1], dtype=acc), hidden.new_empty(hidden.shape[:1], dtype=acc)


@torch.library.custom_op("tempo_ds::linear_cross_entropy_bwd", mutates_args=())
def _backward(grad: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
              labels: torch.Tensor, lse: torch.Tensor, ignore_index: int, softcap: Optional[float],
              scale: Optional[float], compute_dtype: Optional[torch.dtype], rows: int, cols: int,
              mask: Sequence[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dhidden, dweight, dbias); an entry ``mask`` does not ask for is an empty tensor."""
    need_h, need_w, need_b = mask
    compute = compute_dtype or hidden.dtype
    acc = lse.dtype
    n, vocab = hidden.shape[0], weight.shape[0]
    g = torch.where(labels != ignore_index, grad.to(acc), 0).unsqueeze(1)
    if scale is not None:
        g = g * scale  # d(scale * z) / dz, folded into the per-token factor
    with no_autocast(hidden):
        tiles = _Tiles(hidden, weight, bias, compute, rows, cols)
        one_block, one_chunk = tiles.cols >= vocab, tiles.rows >= n
        sub = sub_rows(hidden.device, tiles.rows, tiles.cols)
        ws = None if compute == acc and softcap is None else hidden.new_empty(sub * tiles.cols, dtype=acc)
        ws_t = None if softcap is None else hidden.new_empty(sub * tiles.cols, dtype=acc)
        dh = hbuf = None
        if need_h and one_block:
            dh = hidden.new_empty(hidden.shape, dtype=compute)
        elif need_h:  # summed over vocabulary blocks in float32, rounded once
            dh = hidden.new_zeros(hidden.shape, dtype=acc)
            hbuf = None if compute == acc else hidden.new_empty((tiles.rows, hidden.shape[1]), dtype=compute)
        fresh = torch.zeros_like if n == 0 else torch.empty_like  # no token: no tile writes the gradients
        dw = fresh(weight) if need_w else None
        db = fresh(bias) if need_b else None
        for c0, c1, w, b in tiles.blocks():
            inside, col = _label_column(labels, c0, c1)
            minus_one = inside.to(acc).neg_().unsqueeze(1)
            dw_acc = None if one_chunk or not need_w else hidden.new_zeros((c1 - c0, hidden.shape[1]), dtype=acc)
            db_acc = hidden.new_zeros((c1 - c0,), dtype=acc) if need_b else None
            for r0, r1, z in tiles.chunks(w, b):
                for s0 in range(r0, r1, sub):
                    s1 = min(s0 + sub, r1)
                    zs = z[s0 - r0:s1 - r0]
                    f = zs if ws is None else _view(ws, s1 - s0, c1 - c0)
                    if softcap is not None:  # t = tanh(scale * z / c) kept for the derivative; f = c * t
                        t = _view(ws_t, s1 - s0, c1 - c0).copy_(zs)
                        if scale is not None:
                            t.mul_(scale)
                        torch.mul(t.div_(softcap).tanh_(), softcap, out=f)
                    else:
                        if f is not zs:
                            f.copy_(zs)
                        if scale is not None:
                            f.mul_(scale)
                    f.sub_(lse[s0:s1].unsqueeze(1)).exp_()  # softmax, from the saved lse
                    f.scatter_add_(1, col[s0:s1], minus_one[s0:s1])
                    if softcap is not None:
                        f.mul_(t.mul_(t).neg_().add_(1))
                    f.mul_(g[s0:s1])
                    if need_b:
                        db_acc += f.sum(0)
                    if f is not zs:
                        zs.copy_(f)  # the gradient, rounded to the matmul dtype, into the tile
                if need_h:
                    if one_block:
                        torch.mm(z, w, out=dh[r0:r1])
                    elif hbuf is None:
                        dh[r0:r1].addmm_(z, w)
                    else:
                        dh[r0:r1] += torch.mm(z, w, out=_view(hbuf, r1 - r0, hidden.shape[1]))
                if need_w:
                    if dw_acc is not None and compute == acc:
                        dw_acc.addmm_(z.t(), tiles.h[r0:r1])
                    elif dw_acc is not None:
                        dw_acc += torch.mm(z.t(), tiles.h[r0:r1])
                    elif dw.dtype == compute:
                        torch.mm(z.t(), tiles.h[r0:r1], out=dw[c0:c1])
                    else:  # into the block's weight cast, done with (one chunk, dh above): no new buffer
                        dw[c0:c1] = torch.mm(z.t(), tiles.h[r0:r1], out=w)
            if dw_acc is not None:
                dw[c0:c1] = dw_acc
            if need_b:
                db[c0:c1] = db_acc
    return (dh.to(hidden.dtype) if need_h else hidden.new_empty(0), dw if need_w else hidden.new_empty(0),
            db if need_b else hidden.new_empty(0))


@_backward.register_fake
def _(grad, hidden, weight, bias, labels, lse, ignore_index, softcap, scale, compute_dtype, rows, cols, mask):
    return (hidden.new_empty(hidden.shape) if mask[0] else hidden.new_empty(0),  # dh is row-major, as the op's
            torch.empty_like(weight) if mask[1] else hidden.new_empty(0),
            torch.empty_like(bias) if mask[2] else hidden.new_empty(0))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, ignore_index, softcap, scale, compute_dtype, rows, cols = inputs
    ctx.args = (ignore_index, softcap, scale, compute_dtype, rows, cols)
    ctx.save_for_backward(hidden, weight, bias, labels, output[1])
    ctx.mark_non_differentiable(output[1])
    hold_parameters(ctx, weight, bias)


def _autograd_backward(ctx, grad, _dlse):
    hidden, weight, bias, labels, lse = ctx.saved_tensors
    weight, bias = held_parameters(ctx, weight, bias)
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    mask = [need_h, need_w, need_b and bias is not None]
    with gathered(weight, bias):
        dh, dw, db = _backward(grad, hidden, weight, bias, labels, lse, *ctx.args, mask)
    return (dh if mask[0] else None, dw if mask[1] else None, db if mask[2] else None) + (None,) * 7


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         bias: torch.Tensor | None = None, *, ignore_index: int = -100, reduction: str = "mean",
                         num_items_in_batch: torch.Tensor | int | None = None, softcap: float | None = None,
                         logit_scale: float | None = None, token_chunk: int | None = None,
                         vocab_chunk: int | None = None) -> torch.Tensor:
    """``F.cross_entropy(softcap(logit_scale * F.linear(hidden, weight, bias)).float(), labels)`` without ever
    holding all the logits: the logits are computed in tiles, and recomputed in backward.

    ``hidden`` [..., H], ``weight`` [V, H], ``bias`` [V] or None, ``labels`` [...] (the leading shape of
    ``hidden``; no shifting is done here). ``reduction`` is "mean" (over labels that are not ``ignore_index``),
    "sum" or "none" (float32 loss per token, 0 where ignored). ``num_items_in_batch`` (transformers' gradient
    accumulation) divides the sum instead of the count, with ``reduction="mean"``. ``token_chunk`` /
    ``vocab_chunk`` set the tile (default: :func:`tile_shape`).

    Saved for backward: ``hidden`` (shared with whatever produced it), the weight and bias Parameters, the
    labels (flattened, int64) and a float32 log-sum-exp per token -- never a [tokens, V] tensor. The loss is
    float32 (float64 for float64 inputs). No host syncs: the count of labels stays a device tensor.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}: allowed values: {', '.join(map(repr, REDUCTIONS))}")
    if num_items_in_batch is not None and reduction != "mean":
        raise ValueError(f"num_items_in_batch replaces the count of a 'mean' reduction; got reduction={reduction!r}")
    if weight.dim() != 2 or hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)}: expected hidden [..., H] "
                         f"and weight [V, H]")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"labels {tuple(labels.shape)} must have hidden's leading shape {tuple(hidden.shape[:-1])}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias {tuple(bias.shape)} must be [V] = [{weight.shape[0]}]")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap={softcap!r}: expected a positive number or None")
    for name, value in (("token_chunk", token_chunk), ("vocab_chunk", vocab_chunk)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name}={value!r}: expected a positive int or None")
    compute = autocast_dtype(hidden)
    if compute is None and hidden.dtype != weight.dtype:
        raise TypeError(f"hidden is {hidden.dtype} but weight is {weight.dtype}: outside autocast they must match "
                        f"(as for F.linear)")
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1).to(device=hidden.device, dtype=torch.int64)
    rows, cols = tile_shape(h.shape[0], weight.shape[0], token_chunk, vocab_chunk, (compute or hidden.dtype).itemsize)
    with gathered(weight, bias):
        loss, _ = _forward(h, weight, bias, y, int(ignore_index), None if softcap is None else float(softcap),
                           None if logit_scale is None else float(logit_scale), compute, rows, cols)
    if reduction == "none":
        return loss.view(labels.shape)
    total = loss.sum()
    if reduction == "sum":
        return total
    if num_items_in_batch is None:
        return total / (y != ignore_index).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch
