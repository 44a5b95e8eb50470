"""The training script every launcher in launch/ starts by default: one rank of ``tempo-ds pretrain``.

    deepspeed --num_gpus 2 launch/train.py --deepspeed --deepspeed_config configs/bert-large/zero2-bf16.json \
        --size tiny --steps 3 --micro_batch 2 --report_dir out/

Same arguments as ``tempo-ds pretrain --help`` (model preset, data, steps, checkpoints, --report_dir, the
--tempo_* options and DeepSpeed's). Ranks come from the launcher's environment (RANK/WORLD_SIZE/LOCAL_RANK/
MASTER_ADDR/MASTER_PORT: deepspeed, torchrun, srun via launch/slurm.sbatch); under mpirun they are discovered
through mpi4py (tempo_ds/pretrain/worker.py).
"""
import sys

from tempo_ds.pretrain.cli import main

if __name__ == "__main__":
    sys.exit(main())
