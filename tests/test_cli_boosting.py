"""`warmfit train` and `check-resume` on the XGBoost example spec (one epoch is one
boosting round), and `warmfit demo --tabular`: split commands, a real SIGTERM and the
same command again, each ending in the very state of one uninterrupted command."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import assert_same_state, require
from test_cli_frameworks import ENV, PAUSE, final, train, warmfit  # the examples on PYTHONPATH
from warmfit.checkpoint import read_checkpoint

require("xgboost", reason="xgboost is not installed (extra warmfit[xgboost])")

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
SPEC = EXAMPLES / "xgboost_tabular.toml"


def test_two_commands_of_6_rounds_end_where_one_of_12_ends(tmp_path):
    train(SPEC, tmp_path / "straight", "--epochs", "12")
    for _ in range(2):
        train(SPEC, tmp_path / "split", "--epochs", "6")
    ledger = [json.loads(line) for line in (tmp_path / "split" / "ledger.jsonl").read_text().splitlines()]
    assert [(r["call"], r["epoch_start"], r["epochs_done"]) for r in ledger] == [(0, 0, 6), (1, 6, 6)]
    state = read_checkpoint(final(tmp_path / "split"))[1]
    assert state["settings"]["model"]["framework"] == "xgboost"
    assert_same_state(final(tmp_path / "straight"), final(tmp_path / "split"))


def test_sigterm_mid_run_and_the_same_command_again_end_where_one_run_ends(tmp_path):
    (tmp_path / "pause_at.py").write_text(PAUSE)
    spec = tmp_path / "xgboost_tabular.toml"
    spec.write_text(SPEC.read_text().replace(
        'callbacks = [{ name = "EarlyStopping", patience = 10 }]',
        'callbacks = [{ name = "EarlyStopping", patience = 10 }, { name = "pause_at:Pause", at = 7 }]',
    ))  # fmt: skip
    train(spec, tmp_path / "straight", "--epochs", "12")
    (tmp_path / "pause").touch()
    argv = [sys.executable, "-m", "warmfit", "train", str(spec), "--run-dir", "killed",
            "--verbose", "0", "--epochs", "12"]  # fmt: skip
    proc = subprocess.Popen(argv, cwd=tmp_path, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + 120
    while not (tmp_path / "paused").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the training never reached round 7"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    (tmp_path / "pause").unlink()
    (tmp_path / "release").touch()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert final(tmp_path / "killed").name.endswith("-step-000000000007")
    again = train(spec, tmp_path / "killed", "--epochs", "12")
    assert "warmfit: resumed from killed/checkpoints/" in again.stdout
    assert_same_state(final(tmp_path / "straight"), final(tmp_path / "killed"))


def test_check_resume_is_exact_on_the_xgboost_example(tmp_path):
    done = warmfit("check-resume", SPEC, "--steps", "12", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[0] == "exact"


def test_the_tabular_demo_command_holds_its_checks(tmp_path):
    done = warmfit("demo", "--tabular", "--run-dir", tmp_path / "demo", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Check: three calls == one call, bit for bit: True" in done.stdout
    assert "Check: killed and resumed == the reference, bit for bit: True" in done.stdout
