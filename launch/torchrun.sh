#!/usr/bin/env bash
# Start a training script with torchrun (torch.distributed.run). Multi-node jobs meet at a c10d rendezvous
# hosted by node 0; run this script once per node with the same --nnodes/--master_addr/--master_port/--rdzv_id.
#
# usage: launch/torchrun.sh [options] [-- script arguments]
#
#   --nproc_per_node N  processes on this node (default 1)
#   --nnodes N          number of nodes (default 1)
#   --node_rank N       this node's index, 0..nnodes-1 (required when --nnodes > 1; node 0 hosts the rendezvous)
#   --master_addr ADDR  address of node 0 (required when --nnodes > 1; single node: 127.0.0.1)
#   --master_port PORT  rendezvous port on node 0 (default 29500)
#   --rdzv_id ID        job id shared by all nodes (default tempo-job)
#   --script PATH       training script (default launch/train.py)
#   --dry_run           print the torchrun command instead of running it
#   -h, --help          this text
#
# Environment: PYTHON (default python) runs `python -m torch.distributed.run`; every variable exported on a
# node reaches that node's processes (torchrun starts no remote processes).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }

NPROC=1 NNODES=1 NODE_RANK="" MASTER_ADDR_ARG="" MASTER_PORT_ARG=29500 RDZV_ID=tempo-job
SCRIPT="$LAUNCH_DIR/train.py" DRY_RUN="${DRY_RUN:-0}"
while [ $# -gt 0 ]; do
    case "$1" in
        --nproc_per_node) need_value "$1" $#; NPROC="$2"; shift 2 ;;
        --nnodes) need_value "$1" $#; NNODES="$2"; shift 2 ;;
        --node_rank) need_value "$1" $#; NODE_RANK="$2"; shift 2 ;;
        --rdzv_id) need_value "$1" $#; RDZV_ID="$2"; shift 2 ;;
        --) shift; break ;;
        *) common_option "$@"; shift "$SHIFT" ;;
    esac
done

[ -f "$SCRIPT" ] || die "training script '$SCRIPT' not found"
check_int --nproc_per_node "$NPROC" 1
check_int --nnodes "$NNODES" 1
check_port --master_port "$MASTER_PORT_ARG"
if [ "$NNODES" -gt 1 ]; then
    [ -n "$NODE_RANK" ] || die "--nnodes $NNODES needs --node_rank (this node's index, 0..$((NNODES - 1)))"
    [ -n "$MASTER_ADDR_ARG" ] || die "--nnodes $NNODES needs --master_addr (the address of node 0)"
fi
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR_ARG="${MASTER_ADDR_ARG:-127.0.0.1}"
check_int --node_rank "$NODE_RANK"
[ "$NODE_RANK" -lt "$NNODES" ] || die "--node_rank $NODE_RANK is out of range for --nnodes $NNODES (0..$((NNODES - 1)))"
check_addr --master_addr "$MASTER_ADDR_ARG"
is_host=$([ "$NODE_RANK" = 0 ] && echo true || echo false)
run_or_print "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --nproc_per_node "$NPROC" \
    --node_rank "$NODE_RANK" --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR_ARG:$MASTER_PORT_ARG" \
    --rdzv_id "$RDZV_ID" --rdzv_conf "is_host=$is_host" "$SCRIPT" "$@"
