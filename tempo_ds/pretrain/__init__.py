"""``tempo-ds pretrain``: MLM (BERT, RoBERTa) and causal-LM (GPT-2, Llama) pretraining with DeepSpeed and
tempo_ds, on the embedded corpus or the user's text, under any launcher or on its own.

cli.py      the entry point (checks, then spawn or run)
options.py  the command line, the embedded DeepSpeed config, the checks done before any process group exists
spawn.py    starts the ranks on this machine when no launcher did
worker.py   one rank: data, model, tempo_ds.initialize, the loop, progress, monitor events, signals
checkpoints.py  complete-or-absent checkpoints, resume
summary.py  the end-of-run summary: loss, tokens/s, bytes saved per layer with and without tempo_ds
"""
