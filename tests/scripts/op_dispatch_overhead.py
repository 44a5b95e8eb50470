"""What the triton-op layer costs per call in eager on the CPU: ``tempo_ds::inplace_gelu_fwd`` (the triton op,
which calls the opaque op) against ``tempo_ds::inplace_gelu_fwd_opaque`` alone, on a tiny [4, 64] input so that
the dispatch, not the maths, is what is timed. One thread, best of 7 rounds of 2000 calls each, interleaved.

    PYTHONPATH=. .venv/bin/python tests/scripts/op_dispatch_overhead.py
"""
import time

import torch

import tempo_ds  # noqa: F401  (registers the ops)


def per_call_us(fn, x, calls=2000) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn(x, "none")
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    torch.set_num_threads(1)
    x = torch.randn(4, 64)
    ops = {"triton op (inplace_gelu_fwd)": torch.ops.tempo_ds.inplace_gelu_fwd,
           "opaque op alone (inplace_gelu_fwd_opaque)": torch.ops.tempo_ds.inplace_gelu_fwd_opaque}
    best = {name: float("inf") for name in ops}
    for _ in range(7):
        for name, op in ops.items():
            best[name] = min(best[name], per_call_us(op, x))
    for name, us in best.items():
        print(f"{name:45s} {us:7.1f} us per call")
    a, b = best.values()
    print(f"the triton-op layer: {a - b:.1f} us per call")


if __name__ == "__main__":
    main()
