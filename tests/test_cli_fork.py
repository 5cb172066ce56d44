"""``warmfit fork`` end to end, in subprocesses: a fork of a checkpoint taken in the middle
of a ``warmfit train`` call, trained on by the same command, ends in the very state of
the parent's uninterrupted command (the parent's run directory never touched);
``warmfit history`` shows the lineage, a grandparent's too; each refusal with its message
and exit status 1, nothing written."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from conftest import assert_same_state
from warmfit.cli import main
from warmfit.rundir import RunDir

DIGITS = Path(__file__).resolve().parents[1] / "examples" / "digits.toml"
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def warmfit(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "warmfit", *args], cwd=cwd, env=ENV, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip


def ok(*args: str, cwd: Path) -> str:
    done = warmfit(*args, cwd=cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def files(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): "dir"
        if p.is_dir()
        else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
    }


def test_fork_mid_call_then_the_same_command_ends_where_the_parent_ended(tmp_path):
    # the parent: 3 epochs of 18 steps, a periodic checkpoint at step 50 (mid-call)
    ok("train", str(DIGITS), "--epochs", "3", "--run-dir", "a", "--verbose", "0", cwd=tmp_path)
    a, b = tmp_path / "a", tmp_path / "b"
    at50, _ = [p.name for p in RunDir(a).checkpoints()]
    before = files(a)
    out = ok("fork", "a", "b", "--at", "step=50", cwd=tmp_path)
    assert out == (
        f"forked a at {at50} (run 0, epoch 2, step 50) into b. Train it with `warmfit train "
        "SPEC --run-dir b` (it resumes there); `warmfit history b` shows its lineage.\n"
    )
    assert files(a) == before
    assert sorted(os.listdir(tmp_path)) == ["a", "b"]

    # the same command on the fork finishes the call the checkpoint was taken in (E8)
    out = ok(
        "train", str(DIGITS), "--epochs", "3", "--run-dir", "b", "--verbose", "0", cwd=tmp_path
    )
    fork_first = RunDir(b).checkpoints()[0].name
    assert out.splitlines()[0] == (
        f"warmfit: resumed from b/checkpoints/{fork_first} (run 0, epoch 2, offset 896, step 50)"
    )
    assert files(a) == before
    assert_same_state(RunDir(a).latest(), RunDir(b).latest())  # bit for bit, at step 54

    shown = ok("history", "b", cwd=tmp_path).splitlines()
    assert shown[:5] == [
        f"== lineage: forked from {a.resolve()}",
        f"parent: {a.resolve()}, checkpoint {at50} (run 0, epoch 2 and 896 samples, step 50)",
        "",
        "== ledger: 2 fit calls",
        "call  run  mode      epochs  done  steps  wall_s  final" + " " * 44 + "changes",
    ]
    assert shown[5].split()[:6] == ["0", "0", "fork", "0", "50-50", "0.00"]
    assert shown[6].split()[:6] == ["1", "0", "continue", "3", "1", "50-54"]
    assert "== history of run 0: 3 epochs" in shown  # the parent's 2 and the one it finished

    # a fork of the fork: the grandparent too; the plot marks the forks
    ok("fork", "b", "c", cwd=tmp_path)
    shown = ok("history", "c", "--plot", "c.png", cwd=tmp_path).splitlines()
    assert shown[:4] == [
        f"== lineage: forked from {b.resolve()} (2 generations)",
        f"parent: {b.resolve()}, checkpoint {RunDir(b).latest().name} (run 0, epoch 3, step 54)",
        f"grandparent: {a.resolve()}, checkpoint {at50} (run 0, epoch 2 and 896 samples, step 50)",
        "",
    ]
    assert shown[-1] == "learning curves written to c.png"
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert files(a) == before


def test_fork_refusals_exit_1_with_the_message_and_write_nothing(tmp_path, monkeypatch, capsys):
    from conftest import make_data, make_trainer

    x, y = make_data()
    with make_trainer(run_dir=tmp_path / "a") as t:
        t.fit(x, y, epochs=1)
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("")
    name = RunDir(tmp_path / "a").latest().name
    monkeypatch.chdir(tmp_path)
    before = files(tmp_path)
    cases = {
        ("a", "a"): "cannot fork into a: it is the parent's run directory, which a fork never "
        "changes. Pass a new directory outside it (e.g. a sibling of it).",
        ("a", "empty/../a/x"): "cannot fork into empty/../a/x: it lies inside the parent's run "
        "directory a, which a fork never changes. Pass a new directory outside it (e.g. a "
        "sibling of it).",
        ("missing", "b"): "missing: no such run directory or checkpoint. Pass the run directory "
        "to fork (or one of its checkpoint folders).",
        ("empty", "b"): "empty is not a run directory (no checkpoints/ folder in it) nor a "
        "checkpoint folder (no state.json in it). Pass the run_dir a Trainer or `warmfit train` "
        "wrote, or one of its checkpoint folders.",
        ("a", "b", "--at", "epoch=4"): f"cannot fork a at 'epoch=4': no such checkpoint. Its "
        f"checkpoints: ['{name}']; at= takes one of their names, 'latest', 'best', 'epoch=K' or "
        "'step=S'.",
        ("a", "file"): "cannot fork into file: it is not a directory. Pass a new directory (it "
        "is created) or an empty one.",
    }
    for args, message in cases.items():
        assert main(["fork", *args]) == 1, args
        captured = capsys.readouterr()
        assert (captured.out, captured.err) == ("", f"warmfit fork: {message}\n")
        assert files(tmp_path) == before
    # into a run directory that holds checkpoints: a fork never writes over a run
    assert main(["fork", "a", "b"]) == 0
    capsys.readouterr()
    before = files(tmp_path)
    assert main(["fork", "b", "a"]) == 1
    assert capsys.readouterr().err == (
        f"warmfit fork: cannot fork into a: it already holds checkpoints (1, the newest {name}). "
        "A fork starts a new run directory: pass a new or empty one. To train that run on, "
        "build a Trainer on it (or `warmfit train SPEC --run-dir a`).\n"
    )
    assert files(tmp_path) == before
