"""``tempo-ds pretrain``: the entry point of the command, of ``python -m tempo_ds.pretrain`` and of
launch/train.py. Started by hand it checks its arguments, then starts the ranks (spawn.py); under a launcher it
is one rank (worker.py)."""
from __future__ import annotations

import sys

DESCRIPTION = ("pretrain a preset model with DeepSpeed and tempo_ds on real text (no arguments: a small BERT on "
               "the embedded corpus, 2 ranks, a few minutes)")


def add_parser(subparsers) -> None:
    """List ``pretrain`` among tempo-ds's sub-commands; its arguments are parsed by :func:`main`."""
    p = subparsers.add_parser("pretrain", help=DESCRIPTION, add_help=False, prefix_chars="\0")
    p.add_argument("argv", nargs="*")
    p.set_defaults(func=lambda args: main(args.argv))


def main(argv: list[str] | None = None) -> int:
    """Check the arguments (exit 2 with a message naming the problem, before any process starts), then train:
    here as one rank under a launcher, else in ``--nproc`` ranks started on this machine."""
    from . import spawn
    from .options import parse

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args, inputs = parse(argv)
    except ValueError as exc:  # includes DataError and TempoConfigError
        print(f"tempo-ds pretrain: error: {exc}", file=sys.stderr)
        return 2
    if not spawn.under_launcher():
        return spawn.launch(argv, args.nproc or spawn.default_nproc())
    from .worker import finish, run

    try:
        code = run(args, inputs)
    except ValueError as exc:
        print(f"tempo-ds pretrain: error: {exc}", file=sys.stderr)
        code = 2
    finish(code)
    return code
