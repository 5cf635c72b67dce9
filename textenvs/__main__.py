"""``python -m textenvs``: the registered ids and what each one is.

python -m textenvs list                      # every id, its kind and one line on it
python -m textenvs describe textenvs/Summarize-v0 [--spaces]
"""

from __future__ import annotations

import argparse

import textenvs
from textenvs import catalog
from textenvs.cli import run_cli


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m textenvs",
        description="List the registered textenvs ids, or describe one.",
    )
    p.add_argument("--version", action="version", version=f"textenvs {textenvs.__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="{list,describe}")
    listing = sub.add_parser("list", help="every registered id, its kind and what it is")
    listing.add_argument(
        "--offline", action="store_true", help="only the ids that run without a dataset download"
    )
    describe = sub.add_parser("describe", help="one id: its class, defaults, dataset and docs page")
    describe.add_argument("env_id", help="a registered id, for example textenvs/Summarize-v0")
    describe.add_argument(
        "--spaces",
        action="store_true",
        help="also make the env with its defaults and print its action and observation spaces "
        "(loads its model; a benchmark id needs its dataset)",
    )
    return p


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command == "list":
        ids = [i for i in textenvs.ENV_IDS if catalog.is_offline(i) or not args.offline]
        width = max(len(i) for i in ids)
        for env_id in ids:
            summary = catalog.SUMMARIES[env_id].replace("`", "")
            print(f"{env_id:<{width}}  {catalog.kind(env_id):<10}  {summary}")
        return
    rows = catalog.facts(args.env_id)
    if args.spaces:
        action, observation = catalog.spaces(args.env_id)
        rows += [("action space", action), ("observation space", observation)]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key + ':':<{width + 1}} {value.replace('`', '')}")


def cli() -> None:
    """The ``textenvs`` console script (the same as ``python -m textenvs``)."""
    run_cli(main)


if __name__ == "__main__":
    cli()
