"""Speed of lm_loss="chunked" before and after a change, side by side in one run, as ratios to the plain model.

(a) The LM head + loss alone, forward + backward, at the shapes the defaults run:

* ``bert-tiny``: the ``make run`` / ``tempo-ds pretrain`` default (16 x 128 tokens, h = 128, the tokenizer's
  8192 ids, decoder bias, bf16 weights, MLM labels: 15 % of tokens, the rest -100);
* ``bert-base`` / ``bert-large``: the ``tempo-ds bench`` default run (seq 512 x batch 2 = 1024 tokens, h = 768 /
  1024, fp32 master weights under bf16 autocast, MLM labels);
* ``llama-3``: the Llama-3-shaped preset (512 tokens, h = 512, vocabulary 128256, no bias, bf16, causal labels).

The plain model's head + loss is what transformers runs: ``F.linear`` then ``CrossEntropyLoss`` on the logits as
they come (BERT MLM: the bf16 logits) or upcast first (causal LMs' ``ForCausalLMLoss``: ``logits.float()``).

(b) One training step (forward + backward) of the ``make run`` model (tiny BERT, bf16, s = 128, micro-batch 16) and
of the ``tempo-ds bench`` default preset (BERT-Large, 2 layers, s = 512, batch 2, bf16 autocast over fp32
weights): the plain model, tempo_ds with ``lm_loss="off"``, and the default ``lm_loss="chunked"`` with the op
before and after.

Everything on one thread; CPU time of the calling thread (``time.thread_time``: what other jobs on the cores do
not inflate), best of ``--reps`` interleaved repetitions, wall time alongside. "before" is the op as committed at
``--before`` (loaded from git under another op namespace), "after" the working tree's. Run from the repository
root::

    PYTHONPATH=. .venv/bin/python tests/scripts/lm_loss_speed.py [--reps 5] [--before REV] [--skip-step]
"""
from __future__ import annotations

import argparse
import copy
import subprocess
import sys
import time
import types

import torch
import torch.nn.functional as F

BEFORE = "d49af06"  # linear_cross_entropy before the CPU speed work (tiles 2^23 float32 elements, no workspaces)


def load_before(rev: str):
    """The op module as committed at ``rev``, its custom ops registered as ``tempo_ds_before::...``."""
    src = subprocess.run(["git", "show", f"{rev}:tempo_ds/ops/linear_cross_entropy.py"], check=True,
                         capture_output=True, text=True).stdout
    src = src.replace('"tempo_ds::', '"tempo_ds_before::').replace("from ._", "from tempo_ds.ops._")
    module = types.ModuleType("linear_cross_entropy_before")
    module.__file__ = f"<{rev}:tempo_ds/ops/linear_cross_entropy.py>"
    sys.modules[module.__name__] = module
    exec(compile(src, module.__file__, "exec"), module.__dict__)
    return module.linear_cross_entropy


def best_of(fns: dict, reps: int) -> dict:
    """{name: (best CPU s, best wall s)} over ``reps`` interleaved rounds (one untimed warm-up round first)."""
    for fn in fns.values():
        fn()
    best = {name: [float("inf"), float("inf")] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            c, w = time.thread_time(), time.perf_counter()
            fn()
            c, w = time.thread_time() - c, time.perf_counter() - w
            best[name] = [min(best[name][0], c), min(best[name][1], w)]
    return best


# -- (a) the head + loss alone ---------------------------------------------------------------------------------
SHAPES = {  # name: (tokens, hidden, vocabulary, bias, weights dtype, autocast, MLM)
    "bert-tiny (make run)": (2048, 128, 8192, True, torch.bfloat16, False, True),
    "bert-base (bench s=512 b=2)": (1024, 768, 8192, True, torch.float32, True, True),
    "bert-large (bench default)": (1024, 1024, 8192, True, torch.float32, True, True),
    "llama-3 (V=128256)": (512, 512, 128256, False, torch.bfloat16, False, False),
}


def op_rows(before, after, reps: int) -> list[tuple]:
    rows = []
    for name, (n, hid, vocab, has_bias, dtype, autocast, mlm) in SHAPES.items():
        gen = torch.Generator().manual_seed(0)
        h = torch.randn(n, hid, generator=gen).to(dtype).requires_grad_()
        w = (torch.randn(vocab, hid, generator=gen) * hid ** -0.5).to(dtype).requires_grad_()
        b = (torch.randn(vocab, generator=gen) * 0.1).to(dtype).requires_grad_() if has_bias else None
        y = torch.randint(0, vocab, (n,), generator=gen)
        if mlm:
            y[torch.rand(n, generator=gen) > 0.15] = -100

        def run(loss_fn):
            def step():
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    loss = loss_fn()
                loss.backward()
                for t in (h, w, b):
                    if t is not None:
                        t.grad = None
            return step

        def hf():
            logits = F.linear(h, w, b)
            return F.cross_entropy(logits if mlm else logits.float(), y)

        fns = {"hf": run(hf), "before": run(lambda: before(h, w, y, b)), "after": run(lambda: after(h, w, y, b))}
        best = best_of(fns, reps)
        rows.append((name, best))
    return rows


# -- (b) one training step -----------------------------------------------------------------------------------
def step_rows(before, reps: int) -> list[tuple]:
    import tempo_ds
    import tempo_ds.lm_loss as lm_loss
    from tempo_ds import presets
    from tempo_ds.data import load_tokenizer, sample_batch

    tok = load_tokenizer()
    after = lm_loss.linear_cross_entropy
    cases = {  # name: (build kwargs, batch (seq, micro-batch), autocast)
        "make run (bert tiny, bf16, s=128 x 16)": (dict(arch="bert", size="tiny", dtype="bf16", max_seq=128),
                                                   (128, 16), False),
        "bench default (bert large, 2 layers, s=512 x 2, autocast bf16)": (
            dict(arch="bert", size="large", dtype="fp32", max_seq=512, layers=2), (512, 2), True),
    }
    rows = []
    for name, (build, (seq, mb), autocast) in cases.items():
        base = presets.build_model(build.pop("arch"), build.pop("size"), vocab_size=len(tok), **build).train()
        batch = sample_batch("bert", tok, seq, mb, seed=0)
        models = {"plain": base}
        for variant, cfg in (("lm_loss=off", {"lm_loss": "off"}), ("chunked", {})):
            m = copy.deepcopy(base)
            tempo_ds.inject(m, cfg)
            models[variant] = m

        def run(model, op=None):
            def step():
                lm_loss.linear_cross_entropy = op or after
                try:
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                        loss = model(**batch).loss
                    loss.backward()
                finally:
                    lm_loss.linear_cross_entropy = after
                model.zero_grad(set_to_none=True)
            return step

        fns = {"hf": run(models["plain"]), "lm_loss=off": run(models["lm_loss=off"]),
               "before": run(models["chunked"], before), "after": run(models["chunked"])}
        rows.append((name, best_of(fns, reps)))
        del models, base
    return rows


def table(title: str, rows: list[tuple], cols: list[str]) -> str:
    out = [f"\n{title}\n", "| case | " + " | ".join(f"{c} CPU ms (vs HF)" for c in cols) + " | after vs before |",
           "|---|" + "---|" * (len(cols) + 1)]
    for name, best in rows:
        hf = best["hf"][0]
        cells = [f"{1000 * best[c][0]:.1f} ({best[c][0] / hf:.2f})" for c in cols]
        out.append(f"| {name} | " + " | ".join(cells) + f" | {best['after'][0] / best['before'][0]:.2f} |")
    out.append("\nwall ms: " + "; ".join(f"{name}: " + ", ".join(f"{c} {1000 * best[c][1]:.1f}" for c in cols)
                                         for name, best in rows))
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--before", default=BEFORE, help=f"git revision of the 'before' op (default {BEFORE})")
    p.add_argument("--skip-step", action="store_true", help="only (a), the head + loss alone")
    p.add_argument("--skip-op", action="store_true", help="only (b), the training steps")
    args = p.parse_args()
    torch.set_num_threads(1)
    from tempo_ds.ops import linear_cross_entropy as after

    before = load_before(args.before)
    print(f"torch {torch.__version__}, 1 thread, best of {args.reps}; before = {args.before}, after = working tree")
    if not args.skip_op:
        print(table("(a) LM head + loss alone, forward + backward", op_rows(before, after, args.reps),
                    ["hf", "before", "after"]))
    if not args.skip_step:
        print(table("(b) one training step, forward + backward", step_rows(before, args.reps),
                    ["hf", "lm_loss=off", "before", "after"]))


if __name__ == "__main__":
    main()
