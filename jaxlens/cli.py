"""`jaxlens` command line: one sub-command per job, each in its own module of `jaxlens.commands`
(`jaxlens --help` lists them, `jaxlens COMMAND --help` gives each one's options)."""

from __future__ import annotations

import argparse
import importlib
import sys

from jaxlens.core import validate
from jaxlens.commands import COMMANDS


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("jaxlens")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxlens", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"jaxlens {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"jaxlens.commands.{name}").register(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        # Options are checked before any command loads a model: a wrong --out costs no load time.
        validate.cli_options(args)
        validate.out_dir(getattr(args, "out", None), getattr(args, "overwrite", False))
        if hasattr(args, "init_timeout"):  # a command that loads a model: join the other hosts, check --mesh
            from jaxlens.commands import options

            options.start(args)
            with options.primary_output():
                return args.run(args)
        return args.run(args)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as e:
        print(f"jaxlens {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
