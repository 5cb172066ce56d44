"""Forked runs (``warmfit.fork``): ``Trainer.fork`` and ``Trainer.fork_from`` leave the
parent's run directory byte for byte as it was (its Trainer alive and holding its lock
too), and a fork trained on is bit for bit the parent (or a byte copy of its run
directory) trained on with the same calls — torch, Keras on torch, XGBoost; the lineage
in the ledger, ``lineage.json`` and the plot; every refusal with its message, nothing
written."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import warmfit
from conftest import MLP, assert_same_state, make_data, make_trainer, require, trainer_settings
from warmfit.checkpoint import STATE_FILE, TENSOR_FILE
from warmfit.errors import CheckpointError, StateMismatchError
from warmfit.fork import ForkError, find_source, lineage, lineage_lines
from warmfit.rundir import RunDir

STEPS_PER_EPOCH = 13  # 200 rows, batches of 16


@pytest.fixture
def data() -> tuple[np.ndarray, np.ndarray]:
    return make_data()


def files(root: Path) -> dict[str, str]:
    """Every entry under ``root``: a file's sha256, a folder's or a link's kind."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            out[os.path.relpath(os.path.join(dirpath, name), root)] = "dir"
        for name in filenames:
            path = Path(dirpath, name)
            rel = os.path.relpath(path, root)
            out[rel] = (
                "link" if path.is_symlink() else hashlib.sha256(path.read_bytes()).hexdigest()
            )
    return out


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_same_torch_state(a: warmfit.Trainer, b: warmfit.Trainer) -> None:
    """Every parameter and every optimizer state tensor ``torch.equal``, then the whole
    state bit for bit (:func:`assert_same_state`), and the history's values."""
    for (na, pa), (nb, pb) in zip(
        a.model.named_parameters(), b.model.named_parameters(), strict=True
    ):
        assert na == nb and torch.equal(pa, pb), na
    sa, sb = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for k, slots in sa["state"].items():
        for name, value in slots.items():
            other = sb["state"][k][name]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other
    assert_same_state(a, b)
    assert [{k: v for k, v in r.items() if k != "time"} for r in a.history] == [
        {k: v for k, v in r.items() if k != "time"} for r in b.history
    ]


def checksum(checkpoint: Path) -> str:
    return "xxh3_128:" + json.loads((checkpoint / STATE_FILE).read_text())["tensors_checksum"]


# -- torch: exact, and the parent untouched ---------------------------------------------------
def test_trainer_fork_leaves_the_live_parent_byte_for_byte_and_trains_on_bit_for_bit(
    tmp_path, data
):
    x, y = data
    val = (x[:40], y[:40])
    parent = make_trainer(model=MLP(), run_dir=tmp_path / "a")  # an instance: deep-copied
    parent.fit(x, y, epochs=2, validation_data=val)
    before = files(tmp_path / "a")
    fork = parent.fork(tmp_path / "b")
    assert files(tmp_path / "a") == before  # not a byte, while the parent holds its lock
    assert parent.run_dir.locked and fork.run_dir.locked
    assert fork.run_dir.root == tmp_path / "b" and fork.model is not parent.model
    assert fork.callbacks is not parent.callbacks

    newest = RunDir(tmp_path / "a").latest()
    parent_record = {
        "run_dir": str((tmp_path / "a").resolve()),
        "checkpoint": newest.name,
        "run": 0,
        "epoch": 2,
        "offset": 0,
        "step": 2 * STEPS_PER_EPOCH,
        "checksum": checksum(newest),
    }
    row = {
        "call": 1,
        "run": 0,
        "mode": "fork",
        "parent": parent_record,
        "epoch_start": 2,
        "step_start": 26,
        "step_end": 26,
        "epochs_done": 0,
        "wall_s": 0.0,
        "final": parent.ledger[-1]["final"],
    }
    assert fork.ledger.records == [*parent.ledger.records, row]
    assert jsonl(tmp_path / "b" / "ledger.jsonl") == fork.ledger.records
    assert jsonl(tmp_path / "b" / "history-run0.jsonl") == parent.history.records
    doc = json.loads((tmp_path / "b" / "lineage.json").read_text())
    first = RunDir(tmp_path / "b").latest()
    assert (doc["schema_version"], doc["checkpoint"], doc["parent"], doc["ancestors"]) == (
        1, first.name, parent_record, [],
    )  # fmt: skip
    # the fork's first checkpoint: the parent's tensor file, byte for byte
    assert (first / TENSOR_FILE).read_bytes() == (newest / TENSOR_FILE).read_bytes()
    assert checksum(first) == parent_record["checksum"]
    assert sorted(os.listdir(tmp_path)) == ["a", "b"]  # no temporary folder left

    for t in (parent, fork):
        t.fit(x, y, steps=5, validation_data=val)
    assert_same_torch_state(parent, fork)
    for t in (parent, fork):
        t.fit(x, y, epochs=1, validation_data=val)
    assert_same_torch_state(parent, fork)
    assert fork.ledger[-1]["call"] == parent.ledger[-1]["call"] + 1  # the fork row counts
    parent.close()
    fork.close()


def test_fork_from_a_mid_epoch_checkpoint_equals_the_same_calls_in_a_byte_copy_of_the_parent(
    tmp_path, data
):
    x, y = data
    with make_trainer(run_dir=tmp_path / "a") as parent:  # a model factory
        parent.fit(x, y, epochs=1)
        parent.fit(x, y, steps=3)  # the checkpoint is 3 steps into epoch 2
    shutil.copytree(tmp_path / "a", tmp_path / "copy")
    before = files(tmp_path / "a")
    checkpoint = RunDir(tmp_path / "a").latest()
    settings = trainer_settings()
    fork = warmfit.Trainer.fork_from(checkpoint, tmp_path / "b", MLP, **settings)
    copy = make_trainer(run_dir=tmp_path / "copy")
    assert fork.ledger[-1]["parent"] == {
        "run_dir": str((tmp_path / "a").resolve()),
        "checkpoint": checkpoint.name,
        "run": 0,
        "epoch": 1,
        "offset": 48,
        "step": 16,
        "checksum": checksum(checkpoint),
    }
    for t in (copy, fork):
        t.fit(x, y, steps=4)
    assert_same_torch_state(copy, fork)
    for t in (copy, fork):
        t.fit(x, y, epochs=1)
    assert_same_torch_state(copy, fork)
    assert files(tmp_path / "a") == before
    copy.close()
    fork.close()

    # a run directory: its newest checkpoint; at= chooses another, as rewind does
    assert find_source(tmp_path / "a").parent["checkpoint"] == checkpoint.name
    names = [p.name for p in RunDir(tmp_path / "a").checkpoints()]
    assert find_source(tmp_path / "a", "epoch=1").parent["checkpoint"] == names[0]
    assert find_source(tmp_path / "a", "step=16").parent["checkpoint"] == names[1]
    assert find_source(tmp_path / "a", names[0]).parent["step"] == 13
    assert find_source(tmp_path / "a", str(checkpoint)).parent["step"] == 16
    assert files(tmp_path / "a") == before


def test_a_fork_of_a_fork_records_its_grandparent_and_the_plot_marks_both(tmp_path, data, figures):
    x, y = data
    with make_trainer(run_dir=tmp_path / "a") as a:
        a.fit(x, y, epochs=1)
        with a.fork(tmp_path / "b") as b:
            b.fit(x, y, epochs=1)
            b.fit(x, y, steps=2)
            c = b.fork(tmp_path / "c")
    c.fit(x, y, epochs=1)
    parents = lineage(c.ledger.records)
    assert [(p["run_dir"], p["epoch"], p["offset"], p["step"]) for p in parents] == [
        (str((tmp_path / "b").resolve()), 2, 32, 28),
        (str((tmp_path / "a").resolve()), 1, 0, 13),
    ]
    doc = json.loads((tmp_path / "c" / "lineage.json").read_text())
    assert (doc["parent"], doc["ancestors"]) == (parents[0], parents[1:])
    b_name = RunDir(tmp_path / "b").latest().name
    a_name = RunDir(tmp_path / "a").latest().name
    assert lineage_lines(c.ledger.records) == [
        f"== lineage: forked from {tmp_path.resolve() / 'b'} (2 generations)",
        f"parent: {tmp_path.resolve() / 'b'}, checkpoint {b_name} (run 0, epoch 2 and 32 "
        "samples, step 28)",
        f"grandparent: {tmp_path.resolve() / 'a'}, checkpoint {a_name} (run 0, epoch 1, step 13)",
    ]

    out = c.plot_history(tmp_path / "c.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ax = figures[-1].axes[0]
    # the fit calls (the parents' and its own) at the top, the forks at the bottom
    assert [t.get_text() for t in ax.texts] == [
        " call 0: continue", " call 2: continue", " call 3: continue", " call 5: continue",
        "fork of a at step 13 ", "fork of b at step 28 (mid-epoch) ",
    ]  # fmt: skip
    dashed = [line.get_xdata()[0] for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert dashed == [1.5, 2.5]  # after epoch 1; in epoch 3, after the completed epoch 2
    assert ax.get_title() == "warmfit learning curves — 3 epochs, 4 fit calls"
    labels = [h.get_label() for h in figures[-1].legends[0].legend_handles]
    assert "the parent's epochs" in labels
    c.close()


def test_a_state_that_is_no_checkpoint_is_forked_as_it_is(tmp_path, data):
    x, y = data
    # a Trainer without run_dir: no parent directory, no checkpoint
    with make_trainer() as parent:
        parent.fit(x, y, epochs=1)
        fork = parent.fork(tmp_path / "b")
        assert fork.ledger[-1]["parent"] == {
            "run_dir": None, "checkpoint": None, "run": 0, "epoch": 1, "offset": 0, "step": 13,
            "checksum": None,
        }  # fmt: skip
        for t in (parent, fork):
            t.fit(x, y, steps=3)
        assert_same_torch_state(parent, fork)
        fork.close()
    # weights changed since the last save: the newest checkpoint is not this state
    with make_trainer(run_dir=tmp_path / "a") as parent:
        parent.fit(x, y, epochs=1)
        with torch.no_grad():
            parent.model.net[0].weight.mul_(0.5)
        before = files(tmp_path / "a")
        with parent.fork(tmp_path / "c") as fork:
            assert files(tmp_path / "a") == before
            record = fork.ledger[-1]["parent"]
            assert (record["run_dir"], record["checkpoint"], record["checksum"]) == (
                str((tmp_path / "a").resolve()), None, None,
            )  # fmt: skip
            assert torch.equal(fork.model.net[0].weight, parent.model.net[0].weight)
            for t in (parent, fork):
                t.fit(x, y, steps=3)
            assert_same_torch_state(parent, fork)


# -- other frameworks ---------------------------------------------------------------------------
def test_keras_fork_of_a_live_trainer_and_fork_from_are_exact(tmp_path, data):
    keras = require("keras", reason="keras 3 is not installed")
    x, y = data

    def mlp() -> Any:
        keras.utils.set_random_seed(3)
        return keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
                                 keras.layers.Dropout(0.3), keras.layers.Dense(3)])  # fmt: skip

    settings = dict(
        optimizer=lambda: keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        batch_size=16, seed=7, verbose=0,
    )  # fmt: skip
    parent = warmfit.Trainer(mlp(), run_dir=tmp_path / "a", **settings)  # an instance
    parent.fit(x, y, epochs=1)
    parent.fit(x, y, steps=2)
    before, around = files(tmp_path / "a"), files(tmp_path)
    # Keras' deepcopy of a model names its variables without the model's scope: that
    # copy cannot load the state, so the fork is removed and the model asked for
    with pytest.raises(ForkError) as e:
        parent.fork(tmp_path / "b")
    assert str(e.value).startswith(
        "Trainer.fork copied the model with copy.deepcopy, and the copy does not load this "
        "trainer's state (the checkpoint does not match the model: missing from the "
        "checkpoint: ['dense/bias', "
    )
    assert str(e.value).endswith(
        "Pass model=... to fork: a new model built the same way (its weights come from the "
        "fork's checkpoint), or build the Trainer with a model factory, which fork calls "
        "again. Nothing was written."
    )
    assert files(tmp_path) == around
    fork = parent.fork(tmp_path / "b", model=mlp())
    other = warmfit.Trainer.fork_from(tmp_path / "a", tmp_path / "c", mlp(), **settings)
    assert files(tmp_path / "a") == before
    # a factory is called again: nothing to copy
    with warmfit.Trainer(mlp, framework="keras", **settings) as made:
        made.fit(x, y, steps=3)
        with made.fork(tmp_path / "d") as forked:
            for t in (made, forked):
                t.fit(x, y, steps=4)
            assert_same_state(made, forked)
    for t in (parent, fork, other):
        t.fit(x, y, steps=9)
        t.fit(x, y, epochs=1)
    assert_same_state(parent, fork)
    assert_same_state(parent, other)
    for a, b in zip(parent.model.variables, other.model.variables, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    for t in (parent, fork, other):
        t.close()


def test_xgboost_fork_is_exact_round_for_round(tmp_path):
    xgb = require("xgboost", reason="xgboost is not installed (extra warmfit[xgboost])")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 6))
    y = (x[:, 0] + x[:, 1] * x[:, 2] > 0).astype(np.int64)
    model = xgb.XGBClassifier(subsample=0.7, colsample_bytree=0.7, max_depth=3, n_jobs=1)
    with warmfit.Trainer(model, seed=5, verbose=0, run_dir=tmp_path / "a") as parent:
        parent.fit(x, y, rounds=3)
        before = files(tmp_path / "a")
        with parent.fork(tmp_path / "b") as fork:  # the XGBClassifier deep-copied
            assert files(tmp_path / "a") == before
            assert fork.model is not parent.model
            for t in (parent, fork):
                t.fit(x, y, rounds=4)
            assert_same_state(parent, fork)
            bytes_of = [
                t.state_dict()["tensors"]["model/booster"].tobytes() for t in (parent, fork)
            ]
            assert bytes_of[0] == bytes_of[1]
            assert np.array_equal(parent.predict(x), fork.predict(x))


# -- refusals: nothing written --------------------------------------------------------------
class Unpicklable(MLP):
    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()  # deepcopy refuses it


def test_every_refusal_says_what_to_do_and_writes_nothing(tmp_path, data):
    x, y = data
    parent = make_trainer(run_dir=tmp_path / "a")
    parent.fit(x, y, epochs=1)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    (tmp_path / "file").write_text("")
    with make_trainer(run_dir=tmp_path / "other") as other:
        other.fit(x, y, steps=1)
    (tmp_path / "empty-run").mkdir()
    ckpt = RunDir(tmp_path / "a").latest()
    before = files(tmp_path)
    a = tmp_path / "a"

    def refused(call: Any, message: str, error: type[Exception] = ForkError) -> None:
        with pytest.raises(error) as e:
            call()
        assert str(e.value) == message
        assert files(tmp_path) == before  # nothing written, nothing left behind

    other_ckpt = RunDir(tmp_path / "other").latest().name
    refused(
        lambda: parent.fork(tmp_path / "other"),
        f"cannot fork into {tmp_path / 'other'}: it already holds checkpoints (1, the newest "
        f"{other_ckpt}). A fork starts a new run directory: pass a new or empty one. To "
        f"train that run on, build a Trainer on it (or `warmfit train SPEC --run-dir "
        f"{tmp_path / 'other'}`).",
    )
    refused(
        lambda: parent.fork(a),
        f"cannot fork into {a}: it is the parent's run directory, which a fork never "
        "changes. Pass a new directory outside it (e.g. a sibling of it).",
    )
    refused(
        lambda: warmfit.Trainer.fork_from(ckpt, a / "sub", MLP, **trainer_settings()),
        f"cannot fork into {a / 'sub'}: it lies inside the parent's run directory {a}, which "
        "a fork never changes. Pass a new directory outside it (e.g. a sibling of it).",
    )
    refused(
        lambda: parent.fork(tmp_path / "full"),
        f"cannot fork into {tmp_path / 'full'}: it is not empty (it holds notes.txt). A fork "
        "starts a new run directory: pass a new or empty one.",
    )
    refused(
        lambda: parent.fork(tmp_path / "file" / "b"),
        f"cannot fork into {tmp_path / 'file' / 'b'}: it lies under {tmp_path / 'file'}, "
        "which is not a directory. Pass a new directory (it is created) or an empty one.",
    )
    refused(
        lambda: find_source(tmp_path / "missing"),
        f"{tmp_path / 'missing'}: no such run directory or checkpoint. Pass the run directory "
        "to fork (or one of its checkpoint folders).",
    )
    refused(
        lambda: find_source(tmp_path / "full"),
        f"{tmp_path / 'full'} is not a run directory (no checkpoints/ folder in it) nor a "
        "checkpoint folder (no state.json in it). Pass the run_dir a Trainer or `warmfit "
        "train` wrote, or one of its checkpoint folders.",
    )
    (tmp_path / "empty-run" / "checkpoints").mkdir()
    before = files(tmp_path)
    refused(
        lambda: find_source(tmp_path / "empty-run"),
        f"{tmp_path / 'empty-run'} holds no checkpoint yet: there is nothing to fork. Train "
        "it first (a fit call ends with a checkpoint).",
    )
    for at, why in [
        ("ckpt-00000099-run000-step-000000000001", "no such checkpoint"),
        ("epoch=7", "no such checkpoint"),
        ("lastest", "no such checkpoint"),
        ("best", "none of the newest run's checkpoints records a metric to rank them by"),
        (str(RunDir(tmp_path / "other").latest()), f"{RunDir(tmp_path / 'other').latest()} "
         "is a checkpoint of another run directory"),
    ]:  # fmt: skip
        refused(
            lambda at=at: find_source(a, at),
            f"cannot fork {a} at {at!r}: {why}. Its checkpoints: {[ckpt.name]}; at= takes one "
            "of their names, 'latest', 'best', 'epoch=K' or 'step=S'.",
        )
    refused(
        lambda: find_source(a, "epoch=x"), "at='epoch=x': expected epoch=K with an integer K >= 0."
    )
    refused(
        lambda: find_source(ckpt, "best"),
        f"{ckpt} is a checkpoint folder, and at='best' chooses a checkpoint of a run "
        "directory: pass the run directory with at=..., or the checkpoint alone.",
    )

    # an argument Trainer.fork cannot copy: named, with what to pass instead
    with make_trainer(model=Unpicklable(), run_dir=tmp_path / "u") as odd:
        odd.fit(x, y, steps=1)
        before = files(tmp_path)
        refused(
            lambda: odd.fork(tmp_path / "b"),
            "Trainer.fork cannot copy the Trainer's 'model' argument (Unpicklable: TypeError: "
            "cannot pickle '_thread.lock' object). Pass model=... to fork: a new model of the "
            "same architecture (its weights come from the fork's checkpoint), or build the "
            "Trainer with a model factory, which fork calls again.",
        )
        with odd.fork(tmp_path / "b", model=Unpicklable()) as fork:
            assert fork.global_step == 1
    shutil.rmtree(tmp_path / "b")
    before = files(tmp_path)

    # a Trainer that cannot be built on the fork: the fork is removed again
    with pytest.raises(StateMismatchError):
        warmfit.Trainer.fork_from(a, tmp_path / "b", MLP(hidden=4), **trainer_settings())
    assert files(tmp_path) == before
    (tmp_path / "e").mkdir()
    before = files(tmp_path)
    with pytest.raises(StateMismatchError):
        warmfit.Trainer.fork_from(
            a, tmp_path / "e" / "f" / "g", MLP(hidden=4), **trainer_settings()
        )
    assert files(tmp_path) == before  # the folders it made for the fork are gone too

    # a damaged checkpoint is named, and nothing is written
    parent.close()
    data_file = ckpt / TENSOR_FILE
    raw = bytearray(data_file.read_bytes())
    raw[-1] ^= 0xFF
    data_file.write_bytes(bytes(raw))
    before = files(tmp_path)
    with pytest.raises(CheckpointError, match=r"tensors\.safetensors: checksum mismatch"):
        warmfit.Trainer.fork_from(ckpt, tmp_path / "b", MLP, **trainer_settings())
    assert files(tmp_path) == before
