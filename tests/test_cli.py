"""The command line end to end, in subprocesses: train, train again, history, --plot,
check-resume; and the spec's error messages."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from warmfit import Trainer, __version__
from warmfit.check import compare_states
from warmfit.checkpoint import read_checkpoint
from warmfit.cli import main, read_run
from warmfit.spec import SpecError, load_spec

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
DIGITS = EXAMPLES / "digits.toml"


def warmfit(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "warmfit", *args], cwd=cwd, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_train_train_again_history_and_plot(tmp_path):
    run = tmp_path / "run"
    first = warmfit("train", str(DIGITS), "--epochs", "2", "--run-dir", "run", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "epoch 2/2" in first.stdout and "resumed" not in first.stdout
    again = warmfit("train", str(DIGITS), "--epochs", "1", "--run-dir", "run", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "warmfit: resumed from run/checkpoints/" in again.stdout
    assert "epoch 3/3" in again.stdout  # epochs are additional: 1 more after 2

    ledger = jsonl(run / "ledger.jsonl")
    assert [(r["call"], r["mode"], r["epoch_start"], r["epochs_done"]) for r in ledger] == [
        (0, "continue", 0, 2),
        (1, "continue", 2, 1),
    ]
    assert [(r["step_start"], r["step_end"]) for r in ledger] == [(0, 36), (36, 54)]
    history = jsonl(run / "history-run0.jsonl")
    assert [(r["epoch"], r["segment"]) for r in history] == [(1, 0), (2, 0), (3, 1)]

    shown = warmfit("history", "run", "--plot", "curves.png", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0] == "== ledger: 2 fit calls"
    assert lines[1].split() == [
        "call", "run", "mode", "epochs", "done", "steps", "wall_s", "final", "changes"
    ]  # fmt: skip
    assert lines[2].split()[:6] == ["0", "0", "continue", "2", "2", "0-36"]
    assert lines[3].split()[:6] == ["1", "0", "continue", "1", "1", "36-54"]
    assert "== history of run 0: 3 epochs" in lines
    assert any(line.startswith("overfitting monitor: best val_loss=") for line in lines)
    assert lines[-1] == "learning curves written to curves.png"
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # without the JSONL files, history comes from the newest checkpoint's state
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    for f in copy.glob("*.jsonl"):
        f.unlink()
    assert read_run(copy) == (0, history, ledger)


def test_check_resume_exact_on_digits(tmp_path):
    done = warmfit("check-resume", str(DIGITS), "--steps", "36", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "exact"
    # 18 steps per epoch: N//2 = 18 is an epoch boundary, so it also cuts mid-epoch at 9
    assert "(k = 18, 9)" in done.stdout


def test_check_resume_names_the_divergence(tmp_path):
    done = warmfit(
        "check-resume", str(EXAMPLES / "not_resumable.toml"), "--steps", "6", cwd=tmp_path
    )
    assert done.returncode == 1, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "not exact: 6 steps straight differ from the run saved and loaded at step 3"
    assert lines[1] == "first divergence after step 1; the state entries that differ:"
    assert lines[2].startswith("  parameter net.0.weight (model/net.0.weight): max |difference| ")
    assert any(
        "optimizer slot momentum_buffer of parameter net.0.weight (optim/0/momentum_buffer)" in ln
        for ln in lines
    )
    assert "draws randomness warmfit does not own" in done.stdout


@pytest.mark.parametrize(
    "command", ["train", "history", "check-resume", "demo", "inspect", "verify"]
)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: warmfit {command}")


def write_spec(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    return path


GOOD = 'model = "digits:model"\ndata = "digits:data"\noptimizer = "digits:adam"\nloss = "mse"\n'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('model = "foo"\n' + GOOD.split("\n", 1)[1],
         "'model' must be 'module:function', got 'foo'"),
        (GOOD.replace('model = "digits:model"\n', ""),
         "'model' is missing; add model = 'module:function'"),
        (GOOD + "batch_size = 0\n", "'batch_size' must be an int >= 1, got 0"),
        (GOOD + "epoch = 3\n",
         "unknown key 'epoch'. The keys are: model, framework, data, optimizer, loss, step, "
         "schedule, batch_size, seed, epochs, metrics, callbacks, checkpoint_every, keep_last, "
         "validation_split, run_dir, device, deterministic, monitor, monitor_mode, verbose, "
         "precision, accumulate, clip_grad_norm, ema, ema_warmup, estimators_per_round."),
        (GOOD + "validation_split = 1\n", "'validation_split' must be a float in (0, 1), got 1"),
        ("model = \n", None),
    ],
)  # fmt: skip
def test_spec_errors_name_the_key_and_the_fix(tmp_path, text, message):
    path = write_spec(tmp_path, text)
    with pytest.raises(SpecError) as e:
        load_spec(path)
    if message is None:
        assert str(e.value).startswith(f"spec {path}: not valid TOML: ")
    else:
        assert str(e.value) == f"spec {path}: {message}"


def test_spec_import_errors(tmp_path):
    (tmp_path / "mine.py").write_text("import torch\nVALUE = 3\n")
    path = write_spec(tmp_path, GOOD.replace("digits:model", "mine:VALUE").replace(
        "digits:data", "nowhere_to_be_found:data"))  # fmt: skip
    spec = load_spec(path)
    with pytest.raises(SpecError) as e:
        spec.resolve("model")
    assert str(e.value) == f"spec {path}: 'model' names 'mine:VALUE', which is not callable (a int)"
    with pytest.raises(SpecError) as e:
        spec.load_data()
    assert str(e.value) == (
        f"spec {path}: 'data' names module 'nowhere_to_be_found', which cannot be imported (No "
        "module named 'nowhere_to_be_found'). Put nowhere_to_be_found.py next to the spec or "
        "make it importable (pip install, PYTHONPATH)."
    )


def test_train_reports_a_spec_error_and_exits_1(tmp_path):
    path = write_spec(tmp_path, 'model = "foo"\n' + GOOD.split("\n", 1)[1])
    done = warmfit("train", str(path), cwd=tmp_path)
    assert done.returncode == 1
    assert (
        done.stderr == f"warmfit train: spec {path}: 'model' must be 'module:function', got 'foo'\n"
    )


def test_spec_builds_the_digits_trainer():
    spec = load_spec(DIGITS)
    data = spec.load_data()
    assert data.x.shape == (1437, 64) and data.fit_kwargs() == {"validation_split": 0.2}
    trainer = spec.build_trainer(verbose=0)
    assert (trainer.batch_size, trainer.seed, trainer.run_dir) == (64, 0, None)
    assert [type(cb).__name__ for cb in trainer.callbacks] == [
        "OverfittingMonitor",
        "EarlyStopping",
    ]
    assert spec.default_run_dir() == Path("runs/digits")


def test_train_after_a_setting_changed_says_how_on_the_command_line(tmp_path):
    (tmp_path / "digits.py").write_text((EXAMPLES / "digits.py").read_text())
    spec = tmp_path / "spec.toml"
    text = DIGITS.read_text().replace('"digits:schedule"', '"digits:schedule"\nverbose = 0')
    spec.write_text(text)
    first = warmfit("train", str(spec), "--epochs", "1", "--run-dir", "run", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    spec.write_text(text.replace("batch_size = 64", "batch_size = 32"))
    refused = warmfit("train", str(spec), "--epochs", "1", "--run-dir", "run", cwd=tmp_path)
    assert refused.returncode == 1
    assert refused.stderr.splitlines()[-1].endswith(
        "batch_size: checkpoint 64, now 32. A 'continue' would not be exact. Use the "
        "checkpoint's settings, fit with mode='warm', or pass override=(...) naming the "
        "settings you changed. (On the command line: --override NAME for each setting you "
        "changed, or --mode warm.)"
    )
    args = ("--epochs", "1", "--run-dir", "run", "--override", "batch_size")
    overridden = warmfit("train", str(spec), *args, cwd=tmp_path)
    assert overridden.returncode == 0, overridden.stderr
    assert [r["batch_size"] for r in jsonl(tmp_path / "run" / "ledger.jsonl")] == [64, 32]

    missing = warmfit("history", "run", "--run", "7", cwd=tmp_path)
    assert missing.returncode == 1
    assert missing.stderr == (
        "warmfit history: run has no run 7; its runs are [0]. Pass one of them to --run, or "
        "leave it out for the newest.\n"
    )


def test_train_interrupted_exits_128_plus_the_signal_and_resumes(tmp_path):
    sig, code = signal.SIGTERM, 143  # SIGINT: 130, by the same rule
    (tmp_path / "digits.py").write_text((EXAMPLES / "digits.py").read_text())
    spec = tmp_path / "spec.toml"
    spec.write_text(DIGITS.read_text().split("callbacks = [")[0])  # no early stopping
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    argv = [sys.executable, "-m", "warmfit", "train", str(spec), "--epochs", "500"]
    proc = subprocess.Popen(
        [*argv, "--run-dir", "run"], cwd=tmp_path, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout.readline().startswith("epoch 1/500")  # the handlers are installed
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert f"warmfit train: training stopped by {sig.name} at global step" in err
    again = warmfit("train", str(spec), "--epochs", "1", "--run-dir", "run", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "warmfit: resumed from run/checkpoints/" in again.stdout


BLOCKING = """\
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn


class Blocking(nn.Module):
    \"\"\"Its 5th training forward pass (step 5: epoch 2, batch 2 of 3) writes `blocked`
    next to this file and waits there until `release` appears (at most 20 s).\"\"\"

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        self.calls = 0

    def forward(self, x):
        if self.training:
            self.calls += 1
            if self.calls == 5:
                here = Path(__file__).parent
                (here / "blocked").write_text(str(os.getpid()))
                deadline = time.monotonic() + 20
                while not (here / "release").exists() and time.monotonic() < deadline:
                    time.sleep(0.01)
        return self.net(x)


def data():
    x = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
    return x, (x[:, 0] > 0).astype(np.int64)


def adam(params):
    return torch.optim.Adam(params, lr=1e-2)
"""


def start_blocking_train(tmp_path: Path) -> subprocess.Popen:
    """`warmfit train` of 3 epochs of 3 steps, a checkpoint every 2 steps, whose model
    blocks in the forward pass of step 5 (once `blocked` exists); returns at that point."""
    (tmp_path / "blocking.py").write_text(BLOCKING)
    spec = tmp_path / "blocking.toml"
    spec.write_text(
        'model = "blocking:Blocking"\ndata = "blocking:data"\noptimizer = "blocking:adam"\n'
        'loss = "cross_entropy"\nbatch_size = 16\nverbose = 0\nvalidation_split = 0.25\n'
        "checkpoint_every = 2\nkeep_last = 10\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "warmfit", "train", str(spec), "--epochs", "3", "--run-dir", "run"],
        cwd=tmp_path, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not (tmp_path / "blocked").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the training never reached step 5"
        time.sleep(0.02)
    return proc


def checkpoint_steps(run: Path) -> list[int]:
    return [int(p.name.rpartition("-step-")[2]) for p in sorted(run.glob("checkpoints/ckpt-*"))]


def test_sigint_exits_130_after_saving_at_the_next_step_boundary(tmp_path):
    proc = start_blocking_train(tmp_path)
    proc.send_signal(signal.SIGINT)  # inside step 5: acted on once the step is done
    time.sleep(0.3)
    (tmp_path / "release").touch()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    name = "ckpt-00000003-run000-step-000000000005"
    message = (
        f"training stopped by SIGINT at global step 5: checkpoint written to "
        f"run/checkpoints/{name}. Run the same command again (or construct the Trainer on the "
        "same run_dir and repeat the same fit call) to finish this call exactly where it would "
        "have ended, at epoch 3; a call with other arguments starts anew from step 5."
    )
    # the Trainer's line as it raises, then the command's as it exits
    assert err.splitlines() == [f"warmfit: {message}", f"warmfit train: {message}"]
    assert (tmp_path / "run" / "checkpoints" / "LATEST").read_text().strip() == name
    assert checkpoint_steps(tmp_path / "run") == [2, 4, 5]
    assert jsonl(tmp_path / "run" / "ledger.jsonl")[-1]["stopped_by"] == "SIGINT"


def test_a_second_sigint_stops_at_once_without_the_save(tmp_path):
    proc = start_blocking_train(tmp_path)
    proc.send_signal(signal.SIGINT)  # the first: a flag, acted on at the step boundary
    time.sleep(0.5)
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)  # the second: stops inside step 5, never released
    _, err = proc.communicate(timeout=120)
    stopped_after = time.monotonic() - sent
    # Stopped at once: exit 130 with one line, without the interrupt save or its message.
    assert proc.returncode == 130, err
    assert stopped_after < 10  # the forward pass it stopped would have waited 20 s
    assert "training stopped by" not in err and "Traceback" not in err
    assert err.splitlines()[-1] == (
        "warmfit train: stopped at once by a second interrupt; the newest checkpoint is the "
        "one written before it"
    )
    assert checkpoint_steps(tmp_path / "run") == [2, 4]  # none of step 5
    name = (tmp_path / "run" / "checkpoints" / "LATEST").read_text().strip()
    assert name == "ckpt-00000002-run000-step-000000000004"


def test_train_epochs_3_twice_equals_epochs_6_once_bit_for_bit(tmp_path):
    args = ("train", str(DIGITS), "--verbose", "0", "--run-dir")
    for _ in range(2):  # the first call finished, so the second is a new call: 3 more epochs
        done = warmfit(*args, "split", "--epochs", "3", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
    done = warmfit(*args, "straight", "--epochs", "6", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    ledger = jsonl(tmp_path / "split" / "ledger.jsonl")
    assert [
        (r["call"], r["epoch_start"], r["epochs_done"], "resumes_call" in r) for r in ledger
    ] == [
        (0, 0, 3, False),
        (1, 3, 3, False),
    ]
    straight, split = checkpoint_state(tmp_path / "straight"), checkpoint_state(tmp_path / "split")
    assert straight["state"]["counters"]["epoch"] == split["state"]["counters"]["epoch"] == 6
    assert compare_states(straight, split) == []


# -- errors are one line on stderr, never a traceback --------------------------------------------

TINY = """\
import numpy as np
import torch
from torch import nn


def model():
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def data():
    x = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
    return x, (x[:, 0] > 0).astype(np.int64)


def adam(params):
    return torch.optim.Adam(params, lr=1e-2)
"""


def tiny_spec(tmp_path: Path, extra: str = "") -> Path:
    """A spec of 3 steps an epoch (48 training rows, batch 16); its module is named after
    the test's folder, so that no two tests share an imported module."""
    module = f"tiny_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{module}.py").write_text(TINY)
    spec = tmp_path / "tiny.toml"
    spec.write_text(
        f'model = "{module}:model"\ndata = "{module}:data"\noptimizer = "{module}:adam"\n'
        'loss = "cross_entropy"\nbatch_size = 16\nepochs = 2\nverbose = 0\n'
        f"validation_split = 0.25\n{extra}"
    )
    return spec


def test_check_resume_when_early_stopping_stops_the_straight_run(tmp_path, capsys):
    # patience 0 and an unreachable min_delta: EarlyStopping stops at the end of epoch 2
    spec = tiny_spec(
        tmp_path, 'callbacks = [{ name = "EarlyStopping", patience = 0, min_delta = 10.0 }]\n'
    )
    assert main(["check-resume", str(spec), "--steps", "12"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "exact",
        "6 steps straight == k steps, save, load into a fresh Trainer, 6 - k steps (k = 3, 2): "
        "weights, optimizer state, counters, RNG streams, schedule, callbacks and history are "
        "bit-identical.",
        "The straight run was stopped by EarlyStopping at step 6, before the 12 steps asked: "
        "the 6 steps it trained were compared.",
    ]
    assert main(["check-resume", str(spec), "--steps", "12", "--cut", "3", "--cut", "8"]) == 1
    assert capsys.readouterr().err == (
        "warmfit check-resume: the straight run was stopped by EarlyStopping at step 6, before "
        "the 12 steps asked, so a run cut at step 8 would go on training after it in its next "
        "fit call and cannot be compared. Pass --cut below 6, or --steps 6 or fewer.\n"
    )


def test_train_into_a_file_says_so(tmp_path, capsys):
    spec = tiny_spec(tmp_path)
    assert main(["train", str(spec), "--run-dir", str(spec)]) == 1
    assert capsys.readouterr().err == (
        f"warmfit train: --run-dir {spec} is not a directory. Pass a directory for the run "
        "(it is created if missing).\n"
    )
    assert main(["train", str(spec), "--run-dir", str(spec / "run")]) == 1
    assert capsys.readouterr().err == (
        f"warmfit train: --run-dir {spec / 'run'} lies under {spec}, which is not a directory. "
        "Pass a directory for the run (it is created if missing).\n"
    )


def write_run(root: Path, ledger: list[str], history: list[str]) -> Path:
    """A run dir as training writes it: ledger.jsonl and history-run0.jsonl, a line each."""
    root.mkdir()
    (root / "ledger.jsonl").write_text("".join(line + "\n" for line in ledger))
    (root / "history-run0.jsonl").write_text("".join(line + "\n" for line in history))
    return root


def ledger_row(call: int, mode: str, start: int, end: int) -> str:
    row = {"call": call, "run": 0, "mode": mode, "epoch_start": start, "epochs_done": end - start}
    row.update(epochs_asked=end - start, step_start=3 * start, step_end=3 * end, wall_s=0.1)
    return json.dumps({**row, "final": {}})


def epoch_row(epoch: int, segment: int, loss: float) -> str:
    return json.dumps(
        {"epoch": epoch, "segment": segment, "mode": "continue", "loss": loss, "lr": 0.01}
    )


def test_history_plot_to_a_directory_or_under_a_file_says_so(tmp_path, capsys):
    run = write_run(tmp_path / "run", [ledger_row(0, "continue", 0, 1)], [epoch_row(1, 0, 0.5)])
    (tmp_path / "somedir").mkdir()
    assert main(["history", str(run), "--plot", str(tmp_path / "somedir")]) == 1
    assert capsys.readouterr().err == (
        f"warmfit history: --plot: {tmp_path / 'somedir'} is a directory; pass the PNG file to "
        f"write, e.g. {tmp_path / 'somedir' / 'curves.png'}\n"
    )
    under = run / "ledger.jsonl" / "c.png"
    assert main(["history", str(run), "--plot", str(under)]) == 1
    assert capsys.readouterr().err == (
        f"warmfit history: --plot: cannot write {under}: {run / 'ledger.jsonl'} is a file, not "
        "a directory. Pass a path whose folders are directories (missing ones are created).\n"
    )


def test_demo_on_a_locked_or_foreign_run_dir_says_so(tmp_path, capsys):
    from warmfit.rundir import RunDir

    with RunDir(tmp_path / "locked"):
        assert main(["demo", "--run-dir", str(tmp_path / "locked")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(
        f"warmfit demo: run directory {tmp_path / 'locked'} is locked by this process (pid "
    )
    assert err.count("\n") == 1

    spec = tiny_spec(tmp_path)
    assert main(["train", str(spec), "--run-dir", str(tmp_path / "tiny"), "--epochs", "1"]) == 0
    capsys.readouterr()
    assert main(["demo", "--run-dir", str(tmp_path / "tiny")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("warmfit demo: the checkpoint does not match the model: ")
    assert err.endswith(
        " (The demo goes on only from a run dir an earlier demo wrote: pass a new --run-dir, "
        "or leave it out for a temporary one.)\n"
    )


def digits_uninterrupted() -> dict:
    """``fit(epochs=3)`` from the seed in one call, with the demo's settings written out
    here: the test's own reference, not the demo's."""
    from warmfit import schedules
    from warmfit.demo import load_digits_split

    x, y, _, _ = load_digits_split()
    trainer = Trainer(
        lambda: nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Dropout(0.2), nn.Linear(128, 10)),
        optimizer=lambda params: torch.optim.Adam(params, lr=3e-3), loss="cross_entropy",
        schedule=schedules.warmup(18, schedules.cosine(3e-3, horizon=18 * 12)), batch_size=64,
        seed=0, metrics=["accuracy"], verbose=0,
    )  # fmt: skip
    trainer.fit(x, y, epochs=3, validation_split=0.2)
    return trainer.state_dict()


def checkpoint_state(run_dir: Path, name: str | None = None) -> dict:
    """A checkpoint of ``run_dir`` as ``state_dict()`` gives it: the one LATEST names."""
    folder = run_dir / "checkpoints"
    tensors, state = read_checkpoint(folder / (name or (folder / "LATEST").read_text().strip()))
    return {"tensors": tensors, "state": state}


def with_run(state: dict, run: int) -> dict:
    """``state`` with its run number set to ``run`` (a restart counts runs)."""
    counters = {**state["state"]["counters"], "run": run}
    return {**state, "state": {**state["state"], "counters": counters}}


DEMO_COMPARED = [
    "  compared by warmfit.check.compare_states:",
    "  18 tensors, byte for byte: weights 4, optimizer slots 12, torch RNG 1, validation rows 1",
    "  JSON, type for type: version, counters, rng, epoch_partial, backend, schedule, data,",
    "    call, callbacks, history (3 epochs)",
    "  not compared: ledger, settings (how the calls were driven, not what they trained)",
]


def demo_checks(out: str, run: int) -> None:
    """The demo's two "bit for bit" lines, each True, with what it compared."""
    lines = out.splitlines()
    i = lines.index("Check: the restart == the reference, bit for bit: True")
    note = f"  (all but the run number, which a restart counts: {run} here, 0 there)"
    assert lines[i + 1 : i + 7] == [note, *DEMO_COMPARED]
    i = lines.index("Check: killed and resumed == the reference, bit for bit: True")
    assert lines[i + 1 : i + 6] == DEMO_COMPARED
    assert "child 1: killed by SIGKILL (exit status -9) in step 44;" in lines
    assert "the resumed call's ledger row: steps 40-54, resumes_call 0" in lines
    assert ": False" not in out and "differs:" not in out


def check_killed_and_resumed(folder: Path, reference: dict) -> None:
    """What the demo's part 2 claims, checked on its run dir: a process died inside
    epoch 3 after the step-40 save and never ended its call (no ledger row of its own); a
    new one resumed that call at step 40 and ended it at step 54, with the reference's
    bits."""
    ledger = jsonl(folder / "ledger.jsonl")
    assert [(r["call"], r.get("resumes_call"), r["step_start"], r["step_end"]) for r in ledger] == [
        (0, 0, 40, 54)
    ]
    at_kill = checkpoint_state(folder, "ckpt-00000004-run000-step-000000000040")["state"]
    assert {k: at_kill["counters"][k] for k in ("epoch", "offset", "global_step")} == {
        "epoch": 2, "offset": 256, "global_step": 40,
    }  # fmt: skip
    assert at_kill["call"]["call"] == 0  # the call was still open when the process died
    assert compare_states(reference, checkpoint_state(folder)) == []


def test_demo_kills_resumes_and_what_it_prints_holds_when_checked_here(tmp_path, capsys):
    from warmfit.demo import main as demo_main

    env = dict(os.environ, OMP_NUM_THREADS="1")  # this process trains on 1 thread (conftest)
    done = subprocess.run(
        [sys.executable, "-m", "warmfit", "demo", "--run-dir", "demo"], cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    demo_checks(done.stdout, run=1)
    assert "learning curves, fit calls marked: demo/curves.png" in done.stdout.splitlines()
    assert (tmp_path / "demo" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # What it printed, checked here against a reference computed here.
    reference = digits_uninterrupted()
    check_killed_and_resumed(tmp_path / "demo" / "kill-and-resume", reference)
    restarted = checkpoint_state(tmp_path / "demo")  # part 1 ends with the restart
    assert restarted["state"]["counters"]["run"] == 1
    assert compare_states(reference, with_run(restarted, 0)) == []

    # Again on its own run dir: part 1 goes on from epoch 3 of run 1; part 2 in a new folder.
    demo_main(str(tmp_path / "demo"))
    again = capsys.readouterr().out
    demo_checks(again, run=2)
    lines = again.splitlines()
    assert (
        "-- fit(epochs=3): mode='continue' (the default) — going on from the run dir's epoch 3: "
        "epochs 4-6"
    ) in lines
    assert "A child process runs fit(epochs=3) on a run dir, kill-and-resume-2, saving a" in lines
    check_killed_and_resumed(tmp_path / "demo" / "kill-and-resume-2", reference)
    restarted = checkpoint_state(tmp_path / "demo")
    assert restarted["state"]["counters"]["run"] == 2
    assert compare_states(reference, with_run(restarted, 0)) == []


def test_inspect_exits_1_on_a_damaged_checkpoint_and_shows_the_counters(tmp_path, capsys):
    spec = tiny_spec(tmp_path)
    assert main(["train", str(spec), "--run-dir", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    checkpoint = next((tmp_path / "run" / "checkpoints").glob("ckpt-*"))
    assert main(["inspect", str(checkpoint)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["checksum_ok"] is True and shown["version"]["warmfit"] == __version__
    assert shown["counters"] == {
        "epoch": 2, "offset": 0, "global_step": 6, "samples_seen": 96, "fit_calls": 1, "run": 0,
        "schedule_origin": 0,
    }  # fmt: skip

    tfile = checkpoint / "tensors.safetensors"
    raw = bytearray(tfile.read_bytes())
    raw[-3] ^= 0x10
    tfile.write_bytes(bytes(raw))
    assert main(["inspect", str(checkpoint)]) == 1
    out, err = capsys.readouterr()
    assert json.loads(out)["checksum_ok"] is False
    assert err == (
        f"warmfit inspect: {tfile}: checksum mismatch: the file is damaged. Do not load this "
        "checkpoint; a Trainer resuming its run dir skips it for the newest intact one (warmfit "
        "verify RUN_DIR lists them).\n"
    )


def test_history_keeps_every_ledger_row_and_retrained_epochs_once(tmp_path):
    # Epochs 1-3, then a rewind to epoch 1 that ledger.jsonl records, then 2 epochs again:
    # a later process reuses its call number (the checkpoint it resumed lacks the rewind).
    ledger = [
        ledger_row(0, "continue", 0, 3),
        ledger_row(1, "rewind", 1, 1),
        ledger_row(1, "continue", 1, 3),
    ]
    history = [epoch_row(1, 0, 0.9), epoch_row(2, 0, 0.8), epoch_row(3, 0, 0.7),
               epoch_row(2, 1, 0.6), epoch_row(3, 1, 0.5)]  # fmt: skip
    _, records, rows = read_run(write_run(tmp_path / "run", ledger, history))
    assert [(r["call"], r["mode"]) for r in rows] == [(0, "continue"), (1, "rewind"),
                                                       (1, "continue")]  # fmt: skip
    assert [(r["epoch"], r["loss"]) for r in records] == [(1, 0.9), (2, 0.6), (3, 0.5)]


def test_history_skips_a_line_that_is_json_but_not_an_object(tmp_path, capsys):
    ledger = [ledger_row(0, "continue", 0, 1), "[1, 2]", "7", "{not json"]
    root = write_run(tmp_path / "run", ledger, [epoch_row(1, 0, 0.5), "null"])
    assert main(["history", str(root)]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == "== ledger: 1 fit calls"
    assert err.splitlines() == [
        f"warmfit history: {root / 'ledger.jsonl'}:{n}: skipping a damaged line" for n in (2, 3, 4)
    ] + [f"warmfit history: {root / 'history-run0.jsonl'}:2: skipping a damaged line"]


def test_output_into_a_closed_pipe_exits_141_without_a_traceback(tmp_path):
    history = [epoch_row(e, 0, 1.0 / e) for e in range(1, 200)]
    root = write_run(tmp_path / "run", [ledger_row(0, "continue", 0, 199)], history)
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first byte: `warmfit history | head`
    try:
        done = subprocess.run(
            [sys.executable, "-m", "warmfit", "history", str(root)], stdout=write_end,
            stderr=subprocess.PIPE, text=True, timeout=300,
        )  # fmt: skip
    finally:
        os.close(write_end)
    assert (done.returncode, done.stderr) == (141, "")


def test_history_after_a_rewind_shows_the_rewound_run(tmp_path):
    """A rewind without retraining: the history file marks the epochs after it as gone,
    so `warmfit history` shows the run the trainer now holds."""
    x = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    settings = dict(optimizer=lambda p: torch.optim.SGD(p, lr=0.1), loss="cross_entropy",
                    batch_size=16, verbose=0, run_dir=tmp_path / "run", keep_last=None)  # fmt: skip
    with Trainer(lambda: torch.nn.Linear(4, 2), **settings) as t:
        for _ in range(3):
            t.fit(x, y, epochs=1)
        t.rewind(epoch=1)
        held = [r["epoch"] for r in t.history]
    _, records, rows = read_run(tmp_path / "run")
    assert [r["epoch"] for r in records] == held == [1]
    assert [r["mode"] for r in rows] == ["continue"] * 3 + ["rewind"]
