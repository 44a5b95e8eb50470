"""Count torch.compile graph breaks of tiny injected 2-layer models (train mode, dropout on).

    python tests/scripts/graph_breaks.py [--repo PATH] [--attention lean|tempo] [--reasons]

``--repo`` puts another checkout first on ``sys.path`` (e.g. ``git worktree add /tmp/before <commit>``) so the
same script measures the code before and after a change. For each model it runs ``torch._dynamo.explain`` on
the training forward (loss included) and prints graphs, graph breaks and, with ``--reasons``, the first line of
each break reason.
"""
from __future__ import annotations

import argparse
import sys


def models():
    import transformers

    common = dict(vocab_size=128, max_position_embeddings=32)
    bert = transformers.BertForMaskedLM(transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, **common))
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=2, n_inner=64, n_positions=32, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1,
        vocab_size=128))
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
        attention_dropout=0.1, **common))
    return {"bert": bert, "gpt2": gpt2, "llama": llama}


def batch(padded: bool):
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (2, 12), generator=g)
    mask = torch.ones(2, 12, dtype=torch.long)
    if padded:
        mask[1, 9:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", default=None, help="checkout whose tempo_ds to import (default: installed)")
    parser.add_argument("--attention", default="lean", choices=["lean", "tempo"])
    parser.add_argument("--reasons", action="store_true", help="print the first line of each break reason")
    args = parser.parse_args(argv)
    if args.repo:
        sys.path.insert(0, args.repo)
    import torch
    import tempo_ds

    print(f"tempo_ds from {tempo_ds.__file__}")
    torch.manual_seed(0)
    for name, model in models().items():
        tempo_ds.inject(model, gelu="recompute", norm="inplace", attention=args.attention, dropout="seed")
        model.train()
        for padded in (False, True):
            torch._dynamo.reset()
            b = batch(padded)
            out = torch._dynamo.explain(lambda **kw: model(**kw).loss)(**b)
            print(f"{name:6} padded={padded!s:5} graphs={out.graph_count:3} graph_breaks={out.graph_break_count:3}")
            if args.reasons:
                for reason in out.break_reasons:
                    print("    -", str(reason.reason).splitlines()[0][:160])
    return 0


if __name__ == "__main__":
    sys.exit(main())
