"""The command line end to end, in subprocesses: train, train again, history, --plot,
check-resume; and the spec's error messages."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

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
    assert lines[1].split() == ["call", "run", "mode", "epochs", "done", "steps", "wall_s", "final"]
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
         "unknown key 'epoch'. The keys are: model, data, optimizer, loss, schedule, "
         "batch_size, seed, epochs, metrics, callbacks, checkpoint_every, keep_last, "
         "validation_split, run_dir, device, deterministic, monitor, monitor_mode, verbose."),
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


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_train_interrupted_exits_128_plus_the_signal_and_resumes(tmp_path, sig, code):
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
