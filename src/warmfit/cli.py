"""The command line: ``warmfit train | fork | history | check-resume | demo | inspect | verify``.

Every command has ``--help``. The CLI sits on top of the library and imports only
what the chosen command needs. Exit status: 0 on success, 1 when the command ran and
found a problem (an error in the spec, a damaged checkpoint, a resume that is not
exact), 2 for a wrong command line (argparse), 128 + the signal's number after an
interrupt (130 for SIGINT, 143 for SIGTERM, as a shell reports them; the checkpoint is
written: run the same command again to go on), and 141 (128 + SIGPIPE), without a
traceback, when the reader of the output went away (``warmfit inspect CKPT | head``).

``warmfit train SPEC`` is the process-level "fit again": the Trainer resumes from the
newest checkpoint in the run directory when it is built, so running the same command
again trains ``--epochs`` more epochs, continuing exactly where the last one stopped.
``warmfit fork RUN_DIR NEW_RUN_DIR`` starts a new run directory from a checkpoint of
another (which is only read); ``warmfit train SPEC --run-dir NEW_RUN_DIR`` trains it on.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _demo(args: argparse.Namespace) -> int:
    from .errors import StateMismatchError, TrainingInterrupted, WarmfitError

    if args.tabular:
        from .demo_tabular import main
    else:
        from .demo import main
    try:
        if args.run_dir is not None:
            _check_run_dir(Path(args.run_dir), "--run-dir")
        main(args.run_dir)
    except TrainingInterrupted as err:
        print(f"warmfit demo: {err}", file=sys.stderr)
        return err.exit_code
    except StateMismatchError as err:
        print(
            f"warmfit demo: {err} (The demo goes on only from a run dir an earlier demo "
            "wrote: pass a new --run-dir, or leave it out for a temporary one.)",
            file=sys.stderr,
        )
        return 1
    except BrokenPipeError:
        raise  # the reader of stdout went away: main's business
    except (WarmfitError, ValueError, OSError) as err:
        print(f"warmfit demo: {_message(err)}", file=sys.stderr)
        return 1
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from .checkpoint import TENSOR_FILE, inspect_checkpoint
    from .errors import CheckpointError

    try:
        info = inspect_checkpoint(args.checkpoint)
    except CheckpointError as err:
        print(f"warmfit inspect: {err}", file=sys.stderr)
        return 1
    print(json.dumps(info, indent=2, default=str))
    if not info["checksum_ok"]:
        print(
            f"warmfit inspect: {Path(info['path'], TENSOR_FILE)}: checksum mismatch: the file "
            "is damaged. Do not load this checkpoint; a Trainer resuming its run dir skips "
            "it for the newest intact one (warmfit verify RUN_DIR lists them).",
            file=sys.stderr,
        )
        return 1
    return 0


def _verify(args: argparse.Namespace) -> int:
    from .errors import CheckpointError
    from .rundir import verify_run_dir

    if not Path(args.run_dir, "checkpoints").is_dir():
        print(
            f"warmfit verify: {args.run_dir} is not a run directory (no checkpoints/ folder "
            "in it). Pass the run_dir a Trainer or `warmfit train` wrote.",
            file=sys.stderr,
        )
        return 1
    try:
        results = verify_run_dir(args.run_dir)
    except CheckpointError as err:  # e.g. checkpoints/ is a symbolic link
        print(f"warmfit verify: {err}", file=sys.stderr)
        return 1
    bad = 0
    for path, problem in results:
        status = "ok     " if problem is None else "DAMAGED"
        print(f"{status}  {path}{'' if problem is None else ': ' + problem}")
        bad += problem is not None
    print(f"{len(results)} checkpoints, {bad} damaged")
    return 1 if bad else 0


# -- train ------------------------------------------------------------------------------------


def _train(args: argparse.Namespace) -> int:
    from .errors import StateMismatchError, TrainingInterrupted, WarmfitError
    from .spec import load_spec

    try:
        spec = load_spec(args.spec)
        how: dict[str, int]
        if args.steps is not None:
            how = {"steps": args.steps}
        elif args.until_epoch is not None:
            how = {"until_epoch": args.until_epoch}
        elif args.epochs is not None:
            how = {"epochs": args.epochs}
        elif spec.epochs is not None:
            how = {"epochs": spec.epochs}
        else:
            raise ValueError(
                f"spec {spec.path} sets no 'epochs'; pass --epochs N (additional epochs), "
                "--until-epoch K or --steps N, or add epochs = N to the spec"
            )
        run_dir = Path(args.run_dir) if args.run_dir is not None else spec.default_run_dir()
        _check_run_dir(run_dir, "--run-dir" if args.run_dir is not None else "run dir")
        overrides: dict[str, Any] = {}
        if args.verbose is not None:
            overrides["verbose"] = args.verbose
        if args.override:
            overrides["override"] = tuple(args.override)
        spec.resolve_framework()  # a key the framework cannot use: refused before the data
        data = spec.load_data()
        with spec.build_trainer(run_dir=run_dir, **overrides) as trainer:
            plan = {"past_horizon": args.past_horizon, "cooldown": args.cooldown}
            trainer.fit(data.x, data.y, mode=args.mode, **how, **plan, **data.fit_kwargs())
            c = trainer.counters
            if trainer.rank == 0:
                print(
                    f"run dir {run_dir}: run {c.run}, epoch {c.epoch}, step {c.global_step}. "
                    "Run the same command again to train more (mode continue); "
                    f"`warmfit history {run_dir}` shows the ledger and the curves."
                )
    except TrainingInterrupted as err:
        if os.environ.get("RANK", "0") == "0":
            print(f"warmfit train: {err}", file=sys.stderr)
        return err.exit_code
    except StateMismatchError as err:
        hint = (
            " (On the command line: --override NAME for each setting you changed, or --mode warm.)"
            if "override=" in str(err)
            else ""
        )
        print(f"warmfit train: {err}{hint}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        raise  # the reader of stdout went away: main's business
    except (WarmfitError, ValueError, TypeError, OSError) as err:
        print(f"warmfit train: {_message(err)}", file=sys.stderr)
        return 1
    return 0


def _check_run_dir(run_dir: Path, option: str) -> None:
    """Refuse a run dir that is a file, or lies under one, before anything trains.
    Raises ValueError saying so; a run dir that does not exist yet is fine."""
    from .rundir import file_in_the_way

    path = file_in_the_way(run_dir)
    if path is not None:
        where = "is" if path == run_dir else f"lies under {path}, which is"
        raise ValueError(
            f"{option} {run_dir} {where} not a directory. Pass a directory for the run "
            "(it is created if missing)."
        )


def _message(err: BaseException) -> str:
    """An error's message for a one-line report: ``FILE: reason`` for an OSError that
    names a file (not Python's ``[Errno N] reason: 'FILE'``), else ``str(err)``."""
    if isinstance(err, OSError) and err.strerror and err.filename is not None:
        return f"{os.fsdecode(err.filename)}: {err.strerror}"
    return str(err)


# -- fork -------------------------------------------------------------------------------------


def _fork(args: argparse.Namespace) -> int:
    from .errors import WarmfitError
    from .fork import check_target, find_source, source_root, write_fork

    try:
        check_target(args.new_run_dir, source_root(args.run_dir))  # before reading the parent
        source = find_source(args.run_dir, args.at)
        written = write_fork(args.new_run_dir, source)
    except (WarmfitError, ValueError, OSError) as err:
        print(f"warmfit fork: {_message(err)}", file=sys.stderr)
        return 1
    p = source.parent
    print(
        f"forked {args.run_dir} at {p['checkpoint']} (run {p['run']}, epoch {p['epoch']}, "
        f"step {p['step']}) into {written.root}. Train it with `warmfit train SPEC --run-dir "
        f"{written.root}` (it resumes there); `warmfit history {written.root}` shows its "
        "lineage."
    )
    return 0


# -- history ----------------------------------------------------------------------------------


def read_run(root: str | Path, run: int | None = None) -> tuple[int, list[dict], list[dict]]:
    """``(run, history records of that run, ledger records of every run)`` of a run dir.

    Reads ``ledger.jsonl`` and ``history-run<N>.jsonl`` (appended to as training goes),
    or, if they are missing, the ``history`` and ``ledger`` of the newest checkpoint.
    Every line of ``ledger.jsonl`` is a fit call, a rewind or a fork that happened, so
    every one is kept, in file order (after a crash or a rewind a later row may reuse an
    earlier row's ``call`` number). In a history file an epoch that a resume or a
    rewind trained again replaces the records of that epoch and after it. ``run``
    defaults to the newest run.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such run directory")
    ledger = _read_jsonl(root / "ledger.jsonl")
    runs = sorted(
        int(m.group(1))
        for p in root.glob("history-run*.jsonl")
        if (m := re.fullmatch(r"history-run(\d+)\.jsonl", p.name))
    )
    checkpoint_state = None
    if not ledger or not runs:
        checkpoint_state = _latest_checkpoint_state(root)
        if checkpoint_state is not None:
            ledger = ledger or list(checkpoint_state.get("ledger", []))
    known = runs + [r["run"] for r in ledger if isinstance(r.get("run"), int)]
    if checkpoint_state is not None:
        known.append(checkpoint_state["counters"]["run"])
    if run is None:
        run = max(known, default=0)
    elif known and run not in known:
        raise FileNotFoundError(
            f"{root} has no run {run}; its runs are {sorted(set(known))}. Pass one of them "
            "to --run, or leave it out for the newest."
        )
    file = root / f"history-run{run}.jsonl"
    if file.exists():
        history = _trained_last(_read_jsonl(file), "epoch")
    elif checkpoint_state is not None and checkpoint_state["counters"]["run"] == run:
        history = list(checkpoint_state.get("history", []))
    else:
        history = []
    return run, history, ledger


def _read_jsonl(path: Path) -> list[dict]:
    """The JSON objects of a JSONL file, in file order (none if it does not exist). A
    line that is not a JSON object is skipped with a warning on stderr."""
    if not path.exists():
        return []
    out: list[dict] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            print(f"warmfit history: {path}:{n}: skipping a damaged line", file=sys.stderr)
            continue
        out.append(record)
    return out


def _trained_last(records: list[dict], key: str) -> list[dict]:
    """``records`` where a record whose integer ``key`` is not above the previous
    ones' replaces those (a resume or a rewind trained those epochs again), and a
    ``{"rewound_to_epoch": k}`` line (written by ``Trainer.rewind``) drops the records
    after epoch ``k``."""
    out: list[dict] = []
    for record in records:
        cut = record.get("rewound_to_epoch")
        if isinstance(cut, int):
            out = [r for r in out if not (isinstance(r.get(key), int) and r[key] > cut)]
            continue
        value = record.get(key)
        if isinstance(value, int):
            out = [r for r in out if not (isinstance(r.get(key), int) and r[key] >= value)]
        out.append(record)
    return out


def _latest_checkpoint_state(root: Path) -> dict | None:
    from .checkpoint import read_checkpoint
    from .rundir import RunDir

    latest = RunDir(root).latest()
    if latest is None:
        return None
    return read_checkpoint(latest, verify=False)[1]


def _history(args: argparse.Namespace) -> int:
    from .errors import WarmfitError
    from .history import Ledger, epoch_table
    from .monitor import improvement_line, summary_line

    try:
        run, history, ledger = read_run(args.run, args.run_index)
    except (FileNotFoundError, WarmfitError) as err:
        print(f"warmfit history: {err}", file=sys.stderr)
        return 1
    if not ledger and not history:
        print(
            f"warmfit history: {args.run} holds no ledger, history or checkpoint yet; "
            "train first (warmfit train SPEC --run-dir ...)",
            file=sys.stderr,
        )
        return 1
    from .fork import lineage_lines

    lineage = lineage_lines(ledger)  # a fork: where it came from, nearest first
    if lineage:
        print("\n".join(lineage) + "\n")
    print(f"== ledger: {len(ledger)} fit calls")
    print(Ledger(ledger).table())
    print(f"\n== history of run {run}: {len(history)} epoch{'s' * (len(history) != 1)}")
    print(epoch_table(history) if history else "(no completed epoch)")
    if history:
        print(summary_line(history, args.monitor, args.monitor_mode))
        facts = improvement_line(history, args.monitor, args.monitor_mode)  # "how much more?"
        if facts is not None:
            print(facts)
    if args.plot:
        from .plots import plot_history

        try:
            path = plot_history(
                history,
                [r for r in ledger if r.get("run", run) == run],
                args.plot,
                monitor=args.monitor,
                mode=args.monitor_mode,
                title=f"{Path(args.run).name} (run {run})",
            )
        except (ValueError, OSError) as err:
            print(f"warmfit history: --plot: {_message(err)}", file=sys.stderr)
            return 1
        print(f"learning curves written to {path}")
    return 0


# -- check-resume -------------------------------------------------------------------------------


def _check_resume(args: argparse.Namespace) -> int:
    from .check import check_resume
    from .errors import WarmfitError
    from .spec import load_spec

    try:
        report = check_resume(load_spec(args.spec), args.steps, cuts=args.cut)
    except (WarmfitError, ValueError, TypeError) as err:
        print(f"warmfit check-resume: {err}", file=sys.stderr)
        return 1
    print(report)
    return 0 if report.exact else 1


# -- the parser --------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="warmfit",
        description="One explicit, exact and resumable meaning of 'call fit() again'.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "train",
        help="train from a TOML spec; run it again to continue the run",
        description="Train the model a TOML spec describes (PyTorch, Keras or "
        "scikit-learn). The run directory keeps the checkpoints, the ledger and the "
        "history: running the same command again resumes from the newest checkpoint and "
        "trains more (--epochs are always additional). A spec's keys: model, framework "
        "('torch', 'keras' or 'sklearn'; left out, inferred from what the model factory "
        "returns), data, optimizer, loss, step, schedule, batch_size, seed, epochs, metrics, "
        "callbacks, validation_split, checkpoint_every, keep_last, run_dir, device, "
        "deterministic, monitor, monitor_mode, verbose, the torch step's precision ('32', "
        "'bf16', 'fp16'), accumulate, clip_grad_norm, ema, ema_warmup (see "
        "examples/charlm.toml), and estimators_per_round. Per framework: torch needs "
        "optimizer (params -> torch.optim.Optimizer) and takes loss (optional for a model "
        "whose output has .loss), step and the step's options; keras takes optimizer (() -> "
        "keras.optimizers.Optimizer; optional for a compiled model) and loss "
        "(examples/keras_mlp.toml); sklearn takes neither (an estimator has its own) but "
        "takes estimators_per_round, for ensembles that grow by rounds "
        "(examples/sklearn_sgd.toml). A key the framework cannot use is refused by name, "
        "with what to do instead.",
    )
    p.add_argument(
        "spec", help="the TOML spec (see examples/digits.toml, keras_mlp.toml, sklearn_sgd.toml)"
    )
    how = p.add_mutually_exclusive_group()
    how.add_argument("--epochs", type=_positive_int, help="additional epochs (default: the spec's)")
    how.add_argument("--until-epoch", type=_positive_int, help="train until this global epoch")
    how.add_argument("--steps", type=_positive_int, help="additional optimizer steps")
    p.add_argument(
        "--mode",
        choices=("continue", "warm", "restart"),
        default="continue",
        help="continue (default): go on exactly; warm: keep the weights, fresh optimizer, "
        "schedule and callbacks; restart: a new run from the seed (the old one stays on disk)",
    )
    p.add_argument(
        "--run-dir", help="where the run lives (default: the spec's run_dir, or runs/<spec stem>)"
    )
    p.add_argument(
        "--past-horizon",
        choices=("hold", "extend", "rewarm"),
        help="what this call does past the schedule's horizon (default: the schedule's own)",
    )
    p.add_argument(
        "--cooldown",
        action="store_true",
        help="decay from the current rate to the schedule's end over this call (WSD)",
    )
    p.add_argument("--verbose", type=int, default=None, help="0 for quiet (default: the spec's)")
    p.add_argument(
        "--override",
        action="append",
        choices=("batch_size", "seed"),
        help="continue although this setting differs from the run's checkpoint (the "
        "continuation is then not exact); repeat for several",
    )
    p.set_defaults(func=_train)

    p = sub.add_parser(
        "fork",
        help="start a new run dir from a checkpoint of another run (which is left as it is)",
        description="Write NEW_RUN_DIR, a new run directory whose first checkpoint is a "
        "checkpoint of RUN_DIR, bit for bit, with its history and ledger up to there and "
        "a ledger row (and lineage.json) naming the parent: run dir, checkpoint, epoch, "
        "step and the checkpoint's checksum. RUN_DIR is only read, never locked or "
        "written, so it may be training meanwhile. NEW_RUN_DIR must be new or empty; it "
        "appears whole or not at all. Then `warmfit train SPEC --run-dir NEW_RUN_DIR` "
        "trains the fork on exactly as RUN_DIR would have gone on from that checkpoint.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run directory to fork")
    p.add_argument("new_run_dir", metavar="NEW_RUN_DIR", help="the fork's run dir (new or empty)")
    p.add_argument(
        "--at",
        metavar="CHECKPOINT",
        default=None,
        help="which checkpoint of RUN_DIR: latest (default: the newest intact one), best, "
        "epoch=K (the end of global epoch K), step=S, or a checkpoint's name or path",
    )
    p.set_defaults(func=_fork)

    p = sub.add_parser(
        "history",
        help="the ledger and per-epoch history of a run dir (--plot for learning curves)",
        description="Print the ledger (one row per fit call) and the per-epoch history of a "
        "run directory, and the overfitting monitor's summary line.",
    )
    p.add_argument("run", help="the run directory")
    p.add_argument("--plot", metavar="OUT.png", help="also draw the learning curves to this PNG")
    p.add_argument(
        "--run", dest="run_index", type=int, default=None, help="which run (default: the newest)"
    )
    p.add_argument("--monitor", default="val_loss", help="the value whose best epoch is marked")
    p.add_argument("--monitor-mode", choices=("min", "max"), default="min")
    p.set_defaults(func=_history)

    p = sub.add_parser(
        "check-resume",
        help="check that training resumes bit-exactly (prints 'exact' or the divergence)",
        description="Train N steps straight, and the same N steps split by a save and a "
        "load into a fresh Trainer; compare weights, optimizer state, counters, RNG streams, "
        "schedule and history bit for bit. Prints 'exact' (exit 0), or the first step where "
        "the runs diverge and the state entries that differ (exit 1). If a callback "
        "(EarlyStopping) stops the straight run at step S before N, the S steps it trained "
        "are compared, with cuts below S, and the report says so.",
    )
    p.add_argument("spec", help="the TOML spec")
    p.add_argument("--steps", type=_positive_int, required=True, help="N, the steps to train")
    p.add_argument(
        "--cut",
        type=_positive_int,
        action="append",
        help="save and load after this step (repeatable; default: N//2 and a mid-epoch cut)",
    )
    p.set_defaults(func=_check_resume)

    p = sub.add_parser("demo", help="train an MLP on scikit-learn's digits in several fit calls")
    p.add_argument("--run-dir", default=None, help="keep the run here (default: a temporary dir)")
    p.add_argument(
        "--tabular",
        action="store_true",
        help="instead: XGBoost on scikit-learn's breast-cancer data in several calls, a "
        "schedule over the global round, early stopping, a kill -9 and an exact resume "
        "(needs the xgboost extra)",
    )
    p.set_defaults(func=_demo)
    p = sub.add_parser(
        "inspect",
        help="summarise a checkpoint: counters, tensors, integrity",
        description="Print a checkpoint's summary as JSON: schema, warmfit version, "
        "counters (epoch, offset, global_step, run, ...), tensors (dtype, shape, bytes), "
        "the state's keys and whether the tensor file matches its checksum. Exit 1, with "
        "a line on stderr, if the checkpoint is damaged.",
    )
    p.add_argument("checkpoint")
    p.set_defaults(func=_inspect)
    p = sub.add_parser(
        "verify", help="check every checkpoint of a run dir (exit 1 if any is damaged)"
    )
    p.add_argument("run_dir")
    p.set_defaults(func=_verify)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = int(args.func(args))
        sys.stdout.flush()  # a closed pipe shows here, not at exit
    except BrokenPipeError:
        # The reader went away (`warmfit inspect CKPT | head`). As Python's docs advise:
        # point stdout at devnull so that the flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE.value
    except KeyboardInterrupt:  # a second Ctrl-C: stopped at once, nothing saved for it
        print(
            f"warmfit {args.command}: stopped at once by a second interrupt; the newest "
            "checkpoint is the one written before it",
            file=sys.stderr,
        )
        return 128 + signal.SIGINT.value
    return code
