"""The `lungnlb` command line: one sub-command per module in `lungnlb.commands`.

Each command module exposes `configure(parser)` (adds its arguments) and `run(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from lungnlb.runtime import enable_huge_pages

enable_huge_pages()  # before any command imports torch

# sub-command name -> module that implements it
COMMANDS = {
    "demo": "lungnlb.commands.demo",
    "prepare": "lungnlb.commands.prepare",
    "train": "lungnlb.commands.train",
    "evaluate": "lungnlb.commands.evaluate",
    "explain": "lungnlb.commands.explain",
    "export": "lungnlb.commands.export",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lungnlb", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        summary = module.__doc__.strip().splitlines()[0]
        sub = subparsers.add_parser(name, help=summary.replace("%", "%%"), description=module.__doc__)
        module.configure(sub)
        sub.set_defaults(handler=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except (FileNotFoundError, ValueError) as error:
        print(f"lungnlb {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
