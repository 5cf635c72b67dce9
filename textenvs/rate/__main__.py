"""``python -m textenvs.rate`` (or ``textenvs-rate``): collect human ratings of generated texts.

Add items to a ratings database, serve the rating page, export the ratings::

    python -m textenvs.rate add --db ratings.sqlite --env textenvs/Summarize-v0 --n 20
    python -m textenvs.rate serve --db ratings.sqlite
    python -m textenvs.rate export --db ratings.sqlite --preferences prefs.jsonl \
        --scores scores.jsonl
"""

from __future__ import annotations

import argparse
import json

from textenvs.cli import CommandLineError, json_object, run_cli
from textenvs.rate.store import RatingStore


def _add(args) -> None:
    from textenvs.rate.items import items_from_env, items_from_jsonl

    if (args.jsonl is None) == (args.env is None):
        raise CommandLineError("add needs --jsonl FILE or --env ID (one of them).")
    if args.jsonl is not None:
        items = items_from_jsonl(args.jsonl)
    else:
        items = items_from_env(
            args.env,
            args.n,
            policy=args.policy,
            temperature=args.temperature,
            seed=args.seed,
            split=args.split,
            env_kwargs=args.env_kwargs,
            versus_kwargs=args.versus_kwargs,
            pairs=args.pairs,
        )
    store = RatingStore(args.db)
    before = len(store.items())
    store.add(items)
    added = len(store.items()) - before
    print(f"{added} new items in {args.db} ({len(items) - added} were there already).")


def _serve(args) -> None:
    from textenvs.rate.app import serve

    serve(
        RatingStore(args.db),
        host=args.host,
        port=args.port,
        token=args.token,
        ratings_per_item=args.ratings_per_item,
        title=args.title,
    )


def _export(args) -> None:
    from textenvs.rate.export import preference_rows, score_rows, write_jsonl

    if args.preferences is None and args.scores is None:
        raise CommandLineError("export needs --preferences FILE, --scores FILE or both.")
    store = RatingStore(args.db)
    if args.preferences is not None:
        rows = preference_rows(store, from_scores=not args.no_from_scores)
        write_jsonl(rows, args.preferences, overwrite=args.overwrite)
        print(f"{len(rows)} preference rows (prompt, chosen, rejected) -> {args.preferences}")
    if args.scores is not None:
        rows = score_rows(store)
        write_jsonl(rows, args.scores, overwrite=args.overwrite)
        print(f"{len(rows)} score rows -> {args.scores}")


def _status(args) -> None:
    print(json.dumps(RatingStore(args.db).summary(), indent=2))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m textenvs.rate",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    commands = p.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        formatter = argparse.ArgumentDefaultsHelpFormatter
        sub = commands.add_parser(name, help=help, description=help, formatter_class=formatter)
        sub.add_argument("--db", required=True, help="the ratings database (an SQLite file)")
        return sub

    add = command("add", "Add items to rate: an env's episodes or a JSONL of generations.")
    add.add_argument(
        "--jsonl",
        help='a JSONL file: {"prompt", "text"} (rated 1-5) or {"prompt", "texts": [a, b]} per '
        'line, "reference" optional',
    )
    add.add_argument("--env", help="a generation id whose test episodes are rated")
    add.add_argument("--n", type=int, default=20, help="episodes (prompts) from --env")
    add.add_argument("--policy", choices=("sample", "greedy"), default="sample")
    add.add_argument("--temperature", type=float, default=1.0, help="for --policy sample")
    add.add_argument("--seed", type=int, default=0, help="seeds the sampling")
    add.add_argument("--split", default="test")
    add.add_argument(
        "--env-kwargs", type=json_object, default=None, help="JSON keyword arguments of gym.make"
    )
    add.add_argument(
        "--versus-kwargs",
        type=json_object,
        default=None,
        help='a second configuration: each item pairs both texts, e.g. \'{"model": "runs/x"}\'',
    )
    add.add_argument(
        "--pairs", action="store_true", help="pair two samples of each prompt (a preference)"
    )
    add.set_defaults(run=_add)

    srv = command("serve", "Serve the rating page until Ctrl-C.")
    srv.add_argument(
        "--host",
        default="127.0.0.1",
        help="the address to listen on; any but loopback requires an access token",
    )
    srv.add_argument("--port", type=int, default=8765, help="0: any free port")
    srv.add_argument(
        "--token",
        default=None,
        help="the access token (made up and printed when --host is not loopback)",
    )
    srv.add_argument(
        "--ratings-per-item",
        type=int,
        default=None,
        help="show an item to at most this many raters (default: every rater rates every item)",
    )
    srv.add_argument("--title", default="textenvs ratings", help="the page's heading")
    srv.set_defaults(run=_serve)

    exp = command("export", "Export the ratings: TRL preference rows and a scores JSONL.")
    exp.add_argument("--preferences", help="write {prompt, chosen, rejected} rows here")
    exp.add_argument("--scores", help="write one row per 1-5 rating here")
    exp.add_argument(
        "--no-from-scores",
        action="store_true",
        help="only pair ratings give preference rows (not 1-5 scores of one prompt's texts)",
    )
    exp.add_argument("--overwrite", action="store_true", help="replace existing export files")
    exp.set_defaults(run=_export)

    st = command(
        "status",
        "Print counts: items, live items waiting for a rating, ratings per rater, agreement.",
    )
    st.set_defaults(run=_status)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    args.run(args)


def cli() -> None:
    """The ``textenvs-rate`` console script (the same as ``python -m textenvs.rate``)."""
    run_cli(main)  # a user error as one line, "error: ...", exit status 2


if __name__ == "__main__":
    cli()
