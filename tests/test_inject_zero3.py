"""inject on a model built under deepspeed.zero.Init: partitioned Parameters are kept (never gathered) and a
real ZeRO-3 engine trains the injected model exactly like the plain one. Runs in its own process."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "zero3_inject.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_inject_under_zero_init_and_train_with_zero3(tmp_path):
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port())}
    run = subprocess.run([sys.executable, str(SCRIPT)], env={**os.environ, **env}, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert found["partitioned_before"] == found["params"] == 42     # every parameter really partitioned
    assert found["partitioned_after"] == found["params"]             # inject gathered nothing
    assert found["same_objects"] and found["replaced"] > 0
    # dropout off: the same training; lm_loss=chunked sums the loss in another order (1 ulp on the loss)
    assert found["tempo"] == pytest.approx(found["plain"], rel=1e-6, abs=0)
