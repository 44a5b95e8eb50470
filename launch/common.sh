# Shared by launch/*.sh (sourced). Argument checks that fail fast with a clear message.
LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(dirname "$LAUNCH_DIR")"
PYTHON="${PYTHON:-python}"
export PYTHONPATH="$REPO_DIR${PYTHONPATH:+:$PYTHONPATH}"

die() { echo "$(basename "$0"): error: $*" >&2; echo "run '$(basename "$0") --help' for the arguments" >&2; exit 2; }

need_value() {  # need_value OPTION "$#" : the option needs a following value
    [ "$2" -ge 2 ] || die "$1 needs a value"
}

common_option() {  # common_option "$@": take $1 if it is an option every launcher has; SHIFT = words used (0: not one)
    SHIFT=0
    case "$1" in
        --master_addr) need_value "$1" $#; MASTER_ADDR_ARG="$2"; SHIFT=2 ;;
        --master_port) need_value "$1" $#; MASTER_PORT_ARG="$2"; SHIFT=2 ;;
        --script) need_value "$1" $#; SCRIPT="$2"; SHIFT=2 ;;
        --dry_run) DRY_RUN=1; SHIFT=1 ;;
        -h|--help) usage; exit 0 ;;
    esac
    [ "$SHIFT" -gt 0 ] || die "unknown option '$1' (script arguments go after --)"
}

check_int() {  # check_int NAME VALUE [MIN]
    [[ "$2" =~ ^[0-9]+$ ]] || die "$1 must be a non-negative integer, got '$2'"
    [ "$2" -ge "${3:-0}" ] || die "$1 must be >= ${3:-0}, got $2"
}

check_port() {
    check_int "$1" "$2" 1
    [ "$2" -le 65535 ] || die "$1 must be a port number (1-65535), got $2"
}

check_addr() {  # check_addr NAME VALUE : non-empty, no scheme/port, resolvable
    [ -n "$2" ] || die "$1 is empty"
    [[ "$2" =~ ^[A-Za-z0-9._-]+$ ]] || die "$1 must be a host name or IPv4 address without scheme or port, got '$2'"
    if command -v getent >/dev/null 2>&1; then
        getent hosts "$2" >/dev/null 2>&1 || getent ahosts "$2" >/dev/null 2>&1 \
            || die "$1 '$2' does not resolve to an address"
    fi
}

hostfile_hosts() {  # hostfile_hosts FILE : the host names of a DeepSpeed/OpenMPI hostfile ("host slots=N")
    sed -e 's/#.*//' "$1" | awk 'NF { print $1 }'
}

check_hostfile() {  # check_hostfile FILE : exists, readable, every line "host slots=N"
    [ -f "$1" ] || die "hostfile '$1' not found"
    [ -r "$1" ] || die "hostfile '$1' is not readable"
    local bad
    bad="$(sed -e 's/#.*//' "$1" | awk 'NF && !($0 ~ /^[ \t]*[A-Za-z0-9._-]+[ \t]+slots[ \t]*=[ \t]*[0-9]+[ \t]*$/)' | head -1)"
    [ -z "$bad" ] || die "hostfile '$1': expected lines 'HOST slots=N', got '$bad'"
    [ -n "$(hostfile_hosts "$1")" ] || die "hostfile '$1' lists no hosts"
}

run_or_print() {  # with DRY_RUN=1 print the command (one shell-quoted line) instead of running it
    if [ "${DRY_RUN:-0}" = 1 ]; then printf '%q ' "$@"; echo; else exec "$@"; fi
}
