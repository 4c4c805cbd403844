"""`jaxlens` command line: one sub-command per job, each in its own module of `jaxlens.commands`.

  jaxlens lens    [--model M] [--prompt TEXT | --prompts FILE] --out DIR    logit-lens grid (PNG, HTML, arrays)
  jaxlens latent-language [--source fr] [--target zh] [--words CSV] --out DIR   P(en) vs P(target) per layer
  jaxlens mc-lens (--xcopa zh,sw | --items JSONL) --out DIR                 option probabilities per layer
  jaxlens convert SRC OUT [--dtype D] [--allow-pickle]                   checkpoint -> orbax
  jaxlens families                                                       supported model families
"""

from __future__ import annotations

import argparse
import importlib
import sys

from jaxlens.commands import COMMANDS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxlens", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"jaxlens.commands.{name}").register(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as e:
        print(f"jaxlens {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
