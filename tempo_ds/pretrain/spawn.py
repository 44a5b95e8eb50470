"""Start the ranks of ``tempo-ds pretrain`` on this machine when no launcher did.

Each rank is ``python -m tempo_ds.pretrain`` with the environment a launcher would set (RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR=127.0.0.1, a free MASTER_PORT). Ctrl-C in a terminal reaches every rank (one process
group); a SIGINT or SIGTERM sent to this process alone is passed on. The ranks finish their step and write a
checkpoint before exiting. When a rank fails, the others get a grace period, then are terminated, so a rank
stuck in a collective cannot hang the run.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

# Variables set by deepspeed, torchrun, srun (through launch/slurm.sbatch) and mpirun: a launcher started us.
LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")
GRACE_S = 60.0


def under_launcher() -> bool:
    """Whether a launcher started this process as one rank (its variables are set)."""
    return any(v in os.environ for v in LAUNCHER_VARS)


def local_rank() -> int:
    """This rank's index on its node, as launchers set it (0 when unset)."""
    return int(os.environ.get("LOCAL_RANK", 0))


def default_nproc() -> int:
    """Ranks to start here: one per GPU, else 2."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 2


def free_port() -> int:
    """A TCP port free on this machine now (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argv: list[str], nproc: int) -> int:
    """Run ``nproc`` ranks with ``argv`` and wait; the first non-zero exit status of a rank, else 0."""
    port = str(free_port())
    procs = []
    for rank in range(nproc):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
               "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        procs.append(subprocess.Popen([sys.executable, "-m", "tempo_ds.pretrain", *argv], env=env))

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _wait(procs)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _wait(procs: list[subprocess.Popen]) -> int:
    failed_at, sent = None, set()
    while True:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes):
            code = next((c for c in codes if c), 0)
            return 128 - code if code < 0 else code  # killed by a signal: the shell's convention
        if failed_at is None and any(codes):
            failed_at = time.monotonic()
        if failed_at is not None:
            late = time.monotonic() - failed_at
            # SIGTERM first (a rank then stops after its step); SIGKILL for a rank stuck in a collective.
            for sig, after in ((signal.SIGTERM, GRACE_S), (signal.SIGKILL, 2 * GRACE_S)):
                if late > after and sig not in sent:
                    sent.add(sig)
                    for p in procs:
                        if p.poll() is None:
                            p.send_signal(sig)
        time.sleep(0.2)
