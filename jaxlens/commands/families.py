"""`jaxlens families`: the supported model families, generated from the family tables."""

from __future__ import annotations


def run(args) -> int:
    from jaxlens.converters.families import families

    print("family    model_type(s)     module")
    for family in families():
        print(f"{family.name:<9} {', '.join(family.model_types):<17} {family.config.__module__}")
    return 0


def register(sub) -> None:
    sub.add_parser("families", help="list the supported model families").set_defaults(run=run)
