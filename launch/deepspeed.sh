#!/usr/bin/env bash
# Start a training script with the `deepspeed` launcher (tempo_ds settings travel in the DeepSpeed config's
# "tempo" section and on the script's command line, identical on every node).
#
# usage: launch/deepspeed.sh [options] [-- script arguments]
#
#   --num_gpus N        processes on this node (single node; default: DeepSpeed's choice, all devices)
#   --hostfile FILE     multi-node: lines "HOST slots=N"; without --no_ssh the launcher reaches the other
#                       hosts over passwordless ssh (pdsh) and forwards the variables in .deepspeed_env
#   --no_ssh            multi-node without ssh: run this script once on every node with the same hostfile,
#                       each with its own --node_rank; needs --hostfile, --node_rank and --master_addr
#   --node_rank N       this node's index in the hostfile (0 = the first host), with --no_ssh
#   --master_addr ADDR  address of node 0 (required with --no_ssh; default with --hostfile: its first host)
#   --master_port PORT  rendezvous port (default 29500)
#   --script PATH       training script (default launch/train.py)
#   --dry_run           print the launcher command instead of running it
#   -h, --help          this text
#
# Environment: PYTHON (default python) runs `python -m deepspeed.launcher.runner`. Environment switches for
# other nodes go in .deepspeed_env (NAME=VALUE lines, in the working directory or $HOME); DS_ENV_FILE names
# another file.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }

NUM_GPUS="" HOSTFILE="" NO_SSH=0 NODE_RANK="" MASTER_ADDR_ARG="" MASTER_PORT_ARG=29500
SCRIPT="$LAUNCH_DIR/train.py" DRY_RUN="${DRY_RUN:-0}"
while [ $# -gt 0 ]; do
    case "$1" in
        --num_gpus) need_value "$1" $#; NUM_GPUS="$2"; shift 2 ;;
        --hostfile) need_value "$1" $#; HOSTFILE="$2"; shift 2 ;;
        --no_ssh) NO_SSH=1; shift ;;
        --node_rank) need_value "$1" $#; NODE_RANK="$2"; shift 2 ;;
        --) shift; break ;;
        *) common_option "$@"; shift "$SHIFT" ;;
    esac
done

[ -f "$SCRIPT" ] || die "training script '$SCRIPT' not found"
check_port --master_port "$MASTER_PORT_ARG"
cmd=("$PYTHON" -m deepspeed.launcher.runner --master_port "$MASTER_PORT_ARG")
[ -z "$NUM_GPUS" ] || { check_int --num_gpus "$NUM_GPUS" 1; cmd+=(--num_gpus "$NUM_GPUS"); }

if [ "$NO_SSH" = 1 ]; then
    [ -n "$HOSTFILE" ] || die "--no_ssh needs --hostfile (the same file on every node)"
    [ -n "$NODE_RANK" ] || die "--no_ssh needs --node_rank (this node's index in the hostfile)"
    [ -n "$MASTER_ADDR_ARG" ] || die "--no_ssh needs --master_addr (the address of node 0)"
fi
if [ -n "$NODE_RANK" ]; then
    [ "$NO_SSH" = 1 ] || die "--node_rank is only used with --no_ssh (over ssh the launcher numbers the nodes)"
fi
if [ -n "$HOSTFILE" ]; then
    check_hostfile "$HOSTFILE"
    nodes=$(hostfile_hosts "$HOSTFILE" | wc -l)
    cmd+=(--hostfile "$HOSTFILE")
fi
if [ -n "$NODE_RANK" ]; then
    check_int --node_rank "$NODE_RANK"
    [ "$NODE_RANK" -lt "$nodes" ] || die "--node_rank $NODE_RANK is out of range: hostfile '$HOSTFILE' lists $nodes hosts (0..$((nodes - 1)))"
    cmd+=(--no_ssh --node_rank "$NODE_RANK")
fi
if [ -n "$MASTER_ADDR_ARG" ]; then
    check_addr --master_addr "$MASTER_ADDR_ARG"
    cmd+=(--master_addr "$MASTER_ADDR_ARG")
fi
run_or_print "${cmd[@]}" "$SCRIPT" "$@"
