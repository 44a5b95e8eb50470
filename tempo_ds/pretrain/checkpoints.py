"""Checkpoints that are complete or absent: a run folder never holds a half-written checkpoint that ``latest``
points to.

The checkpoint folder must be on a file system every node sees (DeepSpeed's rank-0 model file is read by
all ranks), unless DeepSpeed's ``checkpoint.use_node_local_storage`` is set. Each save goes to a hidden tag ``.partial-step<N>``; once every rank has written its files, the tag folder is
renamed to ``step<N>`` and ``latest`` is replaced atomically (a temporary file, then ``os.replace``). A save
interrupted at any moment leaves ``latest`` on the previous complete checkpoint and, at worst, a
``.partial-*`` folder that the next save removes and that resuming never reads.
"""
from __future__ import annotations

import os
import shutil

PARTIAL = ".partial-"
LATEST = "latest"


def tag(step: int) -> str:
    """The name of step ``step``'s checkpoint folder."""
    return f"step{step}"


def latest(save_dir: str) -> str | None:
    """The tag of the latest complete checkpoint in ``save_dir``, or None."""
    path = os.path.join(save_dir, LATEST)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        name = f.read().strip()
    return name if name and os.path.isdir(os.path.join(save_dir, name)) else None


def complete(save_dir: str) -> list[str]:
    """Complete checkpoint tags in ``save_dir``, oldest first."""
    if not os.path.isdir(save_dir):
        return []
    tags = [d for d in os.listdir(save_dir) if d.startswith("step") and d[4:].isdigit()
            and os.path.isdir(os.path.join(save_dir, d))]
    return sorted(tags, key=lambda d: int(d[4:]))


def _write_latest(save_dir: str, name: str) -> None:
    tmp = os.path.join(save_dir, f".{LATEST}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(name)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(save_dir, LATEST))


def remove_partials(save_dir: str) -> None:
    """Remove what interrupted saves left behind (never read by ``latest``/``load``)."""
    if os.path.isdir(save_dir):
        for d in os.listdir(save_dir):
            if d.startswith(PARTIAL):
                shutil.rmtree(os.path.join(save_dir, d), ignore_errors=True)


def save(engine, save_dir: str, step: int, client_state: dict, keep: int) -> str:
    """Save ``engine`` (model, optimizer, scheduler, this rank's RNG; ``client_state``) as ``step<step>`` on
    every rank (a collective call) and return its path. Keeps the ``keep`` newest complete checkpoints."""
    import deepspeed.comm as dist

    from ..deepspeed_integration import save_checkpoint

    from .spawn import local_rank as _local_rank

    rank, local_rank = dist.get_rank(), _local_rank()
    partial, final = PARTIAL + tag(step), tag(step)
    if local_rank == 0:
        os.makedirs(save_dir, exist_ok=True)
        remove_partials(save_dir)
    dist.barrier()
    save_checkpoint(engine, save_dir, tag=partial, client_state=client_state, save_latest=False)
    dist.barrier()
    # Rank 0 publishes first; on a node that does not share rank 0's file system the node's first rank does.
    for turn in (True, False):
        if (rank == 0) == turn and local_rank == 0 and os.path.isdir(os.path.join(save_dir, partial)):
            target = os.path.join(save_dir, final)
            if os.path.isdir(target):  # a step saved again after a crash between the rename and `latest`
                shutil.rmtree(target)
            os.replace(os.path.join(save_dir, partial), target)
            _write_latest(save_dir, final)
            for old in complete(save_dir)[:-keep]:
                shutil.rmtree(os.path.join(save_dir, old), ignore_errors=True)
        dist.barrier()
    return os.path.join(save_dir, final)


def load(engine, save_dir: str) -> dict:
    """Load the latest complete checkpoint into ``engine`` (with this rank's RNG state); its client state."""
    from ..deepspeed_integration import load_checkpoint

    name = latest(save_dir)
    if name is None:
        raise ValueError(f"no complete checkpoint in {save_dir}")
    path, client_state = load_checkpoint(engine, save_dir, tag=name)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {os.path.join(save_dir, name)}")
    return client_state
