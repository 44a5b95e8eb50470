"""HF Trainer, plain vs tempo_ds.run, 2 CPU ranks: bytes saved per layer and step time side by side in one run.

    .venv/bin/python tests/scripts/runner_bench.py [--layers 4 --hidden 768 --heads 12 --seq 128 --batch 2 --steps 20]

Launches tests/scripts/noedit_trainer.py (an HF Trainer script with no tempo_ds code) twice through
`deepspeed --num_gpus 2 --module tempo_ds.run`, ZeRO-2, bf16, dropout 0.1, with TEMPO_DS_SUMMARY set:
  plain  the DeepSpeed config without a "tempo" section: the hook calls DeepSpeed's initialize untouched
         (tests/test_runner.py: test_hook_without_section_or_option_changes_nothing), it only meters and times;
  runner the same config with "tempo": {} (tempo_ds's defaults).
Rounds alternate plain and runner; the faster round of each counts. Both use the same instrument: the meter on each engine's first training forward (bytes per transformer
layer) and the median interval between training forwards after the first (the step time). Prints a Markdown
table and writes runner_bench.json beside --out.
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tests" / "scripts" / "noedit_trainer.py"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(tempo: bool) -> dict:
    config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
              "bf16": {"enabled": "auto"}, "zero_optimization": {"stage": 2},
              "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto", "torch_adam": True}}}
    return {**config, "tempo": {}} if tempo else config


def run(variant: str, args, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    config = out / "ds.json"
    config.write_text(json.dumps(_config(variant == "runner")))
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(_port()),
           "--module", "tempo_ds.run", str(SCRIPT), "--deepspeed", str(config), "--use_cpu", "--bf16",
           "--output_dir", str(out / "trainer"), "--max_steps", str(args.steps), "--per_device_train_batch_size",
           str(args.batch), "--report_to", "none", "--save_strategy", "no", "--logging_steps", "1",
           "--disable_tqdm", "true", "--seed", "0", "--layers", str(args.layers), "--hidden", str(args.hidden), "--heads", str(args.heads),
           "--seq", str(args.seq), "--losses_json", str(out / "losses")]
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("TEMPO_DS")}, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO), "TEMPO_DS_SUMMARY": str(out / "summary")}
    start = time.monotonic()
    done = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{variant} run failed:\n{(done.stdout + done.stderr)[-4000:]}")
    (engine,) = json.loads((out / "summary" / "rank0.json").read_text())["engines"]
    losses = json.loads((out / "losses.rank0.json").read_text())["losses"]
    return {"variant": variant, "wall_s": round(time.monotonic() - start, 1), "injected": engine["injected"],
            "summary": engine.get("summary"), "per_layer_bytes": engine["per_layer_bytes"],
            "step_s": engine["step_s"], "losses": losses}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=2, help="plain, runner, plain, runner, ...: the faster round counts")
    p.add_argument("--out", default="/tmp/runner_bench")
    args = p.parse_args()
    rounds = [[run(v, args, Path(args.out) / f"{v}{i}") for v in ("plain", "runner")] for i in range(args.rounds)]
    results = [min((r[k] for r in rounds), key=lambda x: x["step_s"]) for k in (0, 1)]
    for k, name in enumerate(("plain", "runner")):
        results[k]["step_s_rounds"] = [r[k]["step_s"] for r in rounds]
    sbh = args.seq * args.batch * args.hidden
    mid = args.layers // 2
    print(f"HF Trainer (noedit_trainer.py), BERT h={args.hidden} L={args.layers} heads={args.heads}, s={args.seq}, "
          f"micro-batch {args.batch}, bf16, ZeRO-2, 2 CPU ranks x 1 thread, {args.steps} steps\n")
    print("| run | bytes per layer (layer {m}) | sbh | step time (median; each round) | loss first -> last |"
          .format(m=mid))
    print("|---|---|---|---|---|")
    for r in results:
        b = r["per_layer_bytes"][mid]
        each = ", ".join(f"{s:.2f}" for s in r["step_s_rounds"])
        print(f"| {r['variant']} | {b:,} | {b / sbh:.2f} | {r['step_s']:.2f} s ({each}) | "
              f"{r['losses'][0]:.4f} -> {r['losses'][-1]:.4f} |")
    plain, ours = results
    print(f"\nratio: bytes {ours['per_layer_bytes'][mid] / plain['per_layer_bytes'][mid]:.2f}x, "
          f"step time {ours['step_s'] / plain['step_s']:.2f}x")
    print(f"runner report: {ours['summary']}")
    (Path(args.out) / "runner_bench.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
