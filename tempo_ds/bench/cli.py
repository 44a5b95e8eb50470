"""Placeholder: replaced by the real sub-command."""


def add_parser(subparsers) -> None:
    pass
