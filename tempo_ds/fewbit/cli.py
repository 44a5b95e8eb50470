"""``tempo-ds fewbit-tables``: regenerate the shipped few-bit tables, or check that they reproduce."""
from __future__ import annotations

import sys
from pathlib import Path


def add_parser(subparsers) -> None:
    """Add the ``fewbit-tables`` sub-command to the ``tempo-ds`` parser's sub-parsers."""
    from .functions import SMOOTH
    from .tables import SHIPPED

    p = subparsers.add_parser(
        "fewbit-tables", help="solve the optimal few-bit derivative tables (the shipped tables.json)",
        description="Solve, by exact dynamic programming, the optimal piecewise-constant approximations of the "
        "derivatives of the smooth activations at 1-4 bits (uniform weight on [-10, 10]) and write them as the "
        f"tables file. Default: overwrite the shipped file {SHIPPED.name}.")
    p.add_argument("--out", metavar="PATH", default=None, help="write here instead of the shipped file ('-' = stdout)")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 unless regenerating gives exactly "
                   "the shipped entries (with --functions: those functions' entries)")
    p.add_argument("--errors", action="store_true", help="write nothing; print the L2 error of each shipped "
                   "table (integral of (f' - q)^2 under the tables' weight) as a Markdown table")
    p.add_argument("--functions", default=None, metavar="NAMES",
                   help=f"comma-separated subset (default: all of {', '.join(SMOOTH)})")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from . import tables
    from .functions import SMOOTH

    names = SMOOTH if args.functions is None else tuple(n.strip() for n in args.functions.split(",") if n.strip())
    unknown = [n for n in names if n not in SMOOTH]
    if unknown:
        raise ValueError(f"unknown or exact function(s) {', '.join(unknown)}; smooth functions: {', '.join(SMOOTH)}")
    if args.errors:
        print(_error_table(names))
        return 0
    doc = tables.generate(names, progress=lambda n: print(f"solved {n}", file=sys.stderr))
    if args.check:
        shipped = tables.load(tables.SHIPPED)
        meta_ok = all(shipped[k] == doc[k] for k in ("weight", "range", "grid"))
        differing = [n for n in names if shipped["tables"].get(n) != doc["tables"][n]]
        if meta_ok and not differing:
            print(f"{tables.SHIPPED.name}: {len(names)} function(s) reproduced exactly")
            return 0
        what = ", ".join(differing) or "settings"
        print(f"{tables.SHIPPED.name} differs from a fresh solve: {what}", file=sys.stderr)
        return 1
    if args.functions is not None and args.out is None:
        raise ValueError("--functions writes a partial file: give --out (or use --check)")
    text = tables.dumps(doc)
    if args.out == "-":
        sys.stdout.write(text)
    else:
        out = Path(args.out) if args.out else tables.SHIPPED
        out.write_text(text, encoding="utf-8")
        print(f"wrote {out} ({len(names)} functions x {len(tables.BITS)} bit widths)")
    return 0


def _error_table(names) -> str:
    from .solver import l2_error
    from .tables import BITS, table

    lines = ["| function | " + " | ".join(f"{b} bit" for b in BITS) + " |", "|---|" + "---|" * len(BITS)]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(f"{l2_error(name, table(name, b)):.6g}" for b in BITS) + " |")
    return "\n".join(lines)
