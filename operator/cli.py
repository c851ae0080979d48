"""`kubellm operator`: the operator container's entry point (the `kubellm` command's table names it)."""

from __future__ import annotations

from kubellm.operator.handlers import run


def command(args) -> int:
    run(namespace=args.namespace, verbose=args.verbose)
    return 0
