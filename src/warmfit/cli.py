"""The command line: ``warmfit demo | inspect | verify``.

Every command has ``--help``. The CLI sits on top of the library and imports only
what the chosen command needs.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def _demo(args: argparse.Namespace) -> int:
    from .demo import main

    main(args.run_dir)
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from .checkpoint import inspect_checkpoint
    from .errors import CheckpointError

    try:
        info = inspect_checkpoint(args.checkpoint)
    except CheckpointError as err:
        print(f"warmfit inspect: {err}", file=sys.stderr)
        return 1
    print(json.dumps(info, indent=2, default=str))
    return 0


def _verify(args: argparse.Namespace) -> int:
    from .checkpoint import verify_run_dir

    results = verify_run_dir(args.run_dir)
    bad = 0
    for path, problem in results:
        print(f"{'ok     ' if problem is None else 'DAMAGED'}  {path}{'' if problem is None else ': ' + problem}")
        bad += problem is not None
    print(f"{len(results)} checkpoints, {bad} damaged")
    return 1 if bad else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="warmfit", description="One explicit, exact and resumable meaning of 'call fit() again'."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="train an MLP on scikit-learn's digits in several fit calls")
    p.add_argument("--run-dir", default=None, help="keep the run here (default: a temporary dir)")
    p.set_defaults(func=_demo)
    p = sub.add_parser("inspect", help="summarise a checkpoint: counters, tensors, integrity")
    p.add_argument("checkpoint")
    p.set_defaults(func=_inspect)
    p = sub.add_parser("verify", help="check every checkpoint of a run dir (exit 1 if any is damaged)")
    p.add_argument("run_dir")
    p.set_defaults(func=_verify)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))
