"""Bad input to ``Trainer``/``fit``/``evaluate``/``predict`` and to the CLI (issue 9).

One row per case: the call, the exception type and its whole message (a prefix only
where the message holds a set, whose order varies between processes). Rows that had a
poor message (a raw torch error, a silent wrong answer) were ``xfail(strict=True)`` with
the message the fix should give; all are fixed now (``bug`` stays for the next one).
RELIABILITY.md has the table with the message of each.

The bad-data message is promised to name x and y, their shapes and dtypes, and the
framework's own error on the first rows (docs/design.md "Bad input"): the shapes and
dtypes are written out here, and torch's error is computed here, on a model and loss of
our own, independently of warmfit.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import warmfit
from conftest import MLP, make_data, make_trainer

X, Y = make_data(64)
XV, YV = make_data(20, seed=3)


def torch_error(x: Any, y: Any = None, *, target: bool = True) -> str:
    """What torch itself raises for a model of the same shape (8 -> 16 -> 3) and the
    cross-entropy loss on the first two rows."""
    xb = torch.as_tensor(np.asarray(x)[:2])
    try:
        with torch.no_grad():
            out = MLP().eval()(xb)
            if target:
                loss = torch.nn.CrossEntropyLoss()
                loss(out) if y is None else loss(out, torch.as_tensor(np.asarray(y)[:2]))
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    raise AssertionError("torch accepted the data")


def fit_data(what: str, x: str, y: str, error: str) -> str:
    """The whole bad-data message: which data, x and y with their shapes and dtypes,
    torch's error, and what to check."""
    return (
        f"The data does not fit the model or the loss: {what} x {x}, y {y}. On its first "
        f"rows {error}. Check the number of features, the dtypes, and that y matches the loss."
    )


X64 = "(64, 8) torch.float32"
Y64 = "(64,) torch.int64"


def bug(reason: str) -> Any:
    return pytest.mark.xfail(strict=True, raises=AssertionError, reason="BUG: " + reason)


RAW = "raw torch error instead of a warmfit ValueError naming x/y, their shape and dtype"
NAN = "the loss became nan at global step 1 (epoch 0). Training stopped before that step's update: the trainer holds the weights, optimizer and counters after step 0 (the failed step's forward pass has drawn from the random streams). Lower the learning rate, or check the data for NaN/inf."

# id: (call on a fresh trainer t, exception type, the whole message[, marks])
CASES: dict[str, tuple[Callable[[warmfit.Trainer], Any], type, str, tuple]] = {
    # -- x -------------------------------------------------------------------------------
    "x of strings": (
        lambda t: t.fit(X.astype(str), Y, epochs=1),
        TypeError,
        "x must be numeric (a numpy array or torch tensor). Got dtype <U32.",
        (),
    ),
    "x of objects": (
        lambda t: t.fit(np.array([object()] * 64), Y, epochs=1),
        TypeError,
        "x must be numeric (a numpy array or torch tensor). Got dtype object.",
        (),
    ),
    "x is None": (
        lambda t: t.fit(None, Y, epochs=1),
        TypeError,
        "x must be numeric (a numpy array or torch tensor). Got dtype object.",
        (),
    ),
    "x is a dict": (  # a structure since issue 18: refused by the forward it cannot reach
        lambda t: t.fit({"a": X}, Y, epochs=1),
        ValueError,
        "The data does not fit the model's forward: fit: x is a dict with keys ['a'], passed "
        "to it as model(**x), and MLP.forward takes (x): keys without a parameter: ['a']; "
        "parameters without a key: ['x']. Name the keys (or order the parts) as the forward's "
        "parameters, or pass step=fn(model, batch) -> loss, which calls the model as it wants.",
        (),
    ),
    "x with NaN": (
        lambda t: t.fit(np.full_like(X, np.nan), Y, epochs=1),
        warmfit.NonFiniteLossError,
        NAN,
        (),
    ),
    "x with inf": (
        lambda t: t.fit(np.full_like(X, np.inf), Y, epochs=1),
        warmfit.NonFiniteLossError,
        NAN,
        (),
    ),
    "0 rows": (
        lambda t: t.fit(X[:0], Y[:0], epochs=1),
        ValueError,
        "x has no samples: nothing to train on.",
        (),
    ),
    "x, y lengths differ": (
        lambda t: t.fit(X, Y[:10], epochs=1),
        ValueError,
        "x and y must have the same number of samples. Got 64 rows in x and 10 in y.",
        (),
    ),
    "x is a scalar": (
        lambda t: t.fit(np.float32(1), None, epochs=1),
        ValueError,
        "x must have at least one dimension (samples first). Got a scalar np.float32(1.0).",
        (),
    ),
    "x is 1-D": (
        lambda t: t.fit(X[:, 0], Y, epochs=1),
        ValueError,
        fit_data("fit:", "(64,) torch.float32", Y64, torch_error(X[:, 0], Y)),
        (),
    ),
    "x has 5 features, model 8": (
        lambda t: t.fit(X[:, :5], Y, epochs=1),
        ValueError,
        fit_data("fit:", "(64, 5) torch.float32", Y64, torch_error(X[:, :5], Y)),
        (),
    ),
    "x int64": (
        lambda t: t.fit(X.astype(np.int64), Y, epochs=1),
        ValueError,
        fit_data("fit:", "(64, 8) torch.int64", Y64, torch_error(X.astype(np.int64), Y)),
        (),
    ),
    "x bool": (
        lambda t: t.fit(X > 0, Y, epochs=1),
        ValueError,
        fit_data("fit:", "(64, 8) torch.bool", Y64, torch_error(X > 0, Y)),
        (),
    ),
    "x complex": (
        lambda t: t.fit(X.astype(np.complex64), Y, epochs=1),
        ValueError,
        fit_data("fit:", "(64, 8) torch.complex64", Y64, torch_error(X.astype(np.complex64), Y)),
        (),
    ),
    # -- y -------------------------------------------------------------------------------
    "y of strings": (
        lambda t: t.fit(X, Y.astype(str), epochs=1),
        TypeError,
        "y must be numeric (a numpy array or torch tensor). Got dtype <U21.",
        (),
    ),
    "y float for cross_entropy": (
        lambda t: t.fit(X, Y.astype(np.float32), epochs=1),
        ValueError,
        fit_data("fit:", X64, "(64,) torch.float32", torch_error(X, Y.astype(np.float32))),
        (),
    ),
    "y class out of range": (
        lambda t: t.fit(X, Y + 10, epochs=1),
        ValueError,
        fit_data("fit:", X64, Y64, torch_error(X, Y + 10)),
        (),
    ),
    "y 2-D for cross_entropy": (
        lambda t: t.fit(X, np.stack([Y, Y], 1), epochs=1),
        ValueError,
        fit_data("fit:", X64, "(64, 2) torch.int64", torch_error(X, np.stack([Y, Y], 1))),
        (),
    ),
    "y missing for cross_entropy": (
        lambda t: t.fit(X, None, epochs=1),
        ValueError,
        fit_data("fit:", X64, "None", torch_error(X, None)),
        (),
    ),
    # -- validation ----------------------------------------------------------------------
    "validation_split 0.0": (
        lambda t: t.fit(X, Y, epochs=1, validation_split=0.0),
        ValueError,
        "The 'validation_split' parameter of Trainer.fit must be a float "
        "in (0, 1). Got 0.0 instead.",
        (),
    ),
    "validation_split 1.0": (
        lambda t: t.fit(X, Y, epochs=1, validation_split=1.0),
        ValueError,
        "The 'validation_split' parameter of Trainer.fit must be a float "
        "in (0, 1). Got 1.0 instead.",
        (),
    ),
    "validation_split -0.1": (
        lambda t: t.fit(X, Y, epochs=1, validation_split=-0.1),
        ValueError,
        "The 'validation_split' parameter of Trainer.fit must "
        "be a float in (0, 1). Got -0.1 instead.",
        (),
    ),
    "validation_split 1 (int)": (
        lambda t: t.fit(X, Y, epochs=1, validation_split=1),
        ValueError,
        "The 'validation_split' parameter of Trainer.fit must be a float in (0, 1). Got 1 instead.",
        (),
    ),
    "validation_split '0.2'": (
        lambda t: t.fit(X, Y, epochs=1, validation_split="0.2"),
        ValueError,
        "The 'validation_split' parameter of Trainer.fit "
        "must be a float in (0, 1). Got '0.2' instead.",
        (),
    ),
    "validation_split leaves no train rows": (
        lambda t: t.fit(X, Y, epochs=1, validation_split=0.999),
        ValueError,
        "validation_split=0.999 of 64 samples leaves no training samples. Choose a "
        "fraction that leaves at least one sample on each side.",
        (),
    ),
    "validation_data not a pair": (
        lambda t: t.fit(X, Y, epochs=1, validation_data=XV),
        ValueError,
        "validation_data must be a pair (x_val, y_val). Got ndarray of length 20.",
        (),
    ),
    "validation_data triple": (
        lambda t: t.fit(X, Y, epochs=1, validation_data=(XV, YV, YV)),
        ValueError,
        "validation_data must be a pair (x_val, y_val). Got tuple of length 3.",
        (),
    ),
    "validation_data lengths differ": (
        lambda t: t.fit(X, Y, epochs=1, validation_data=(XV, YV[:3])),
        ValueError,
        "x and y must have the same number of samples. Got 20 rows in x and 3 in y.",
        (),
    ),
    "validation_data 5 features": (
        lambda t: t.fit(X, Y, epochs=1, validation_data=(XV[:, :5], YV)),
        ValueError,
        fit_data(
            "validation:", "(20, 5) torch.float32", "(20,) torch.int64", torch_error(XV[:, :5], YV)
        ),
        (),
    ),
    "validation_data and split": (
        lambda t: t.fit(X, Y, epochs=1, validation_data=(XV, YV), validation_split=0.2),
        ValueError,
        "Pass either validation_data or validation_split, not both.",
        (),
    ),
    # -- epochs / steps / mode -------------------------------------------------------------
    "epochs 1.5": (
        lambda t: t.fit(X, Y, epochs=1.5),
        ValueError,
        "The 'epochs' parameter of Trainer.fit must be an int >= 1. Got 1.5 instead.",
        (),
    ),
    "epochs '2'": (
        lambda t: t.fit(X, Y, epochs="2"),
        ValueError,
        "The 'epochs' parameter of Trainer.fit must be an int >= 1. Got '2' instead.",
        (),
    ),
    "epochs True": (
        lambda t: t.fit(X, Y, epochs=True),
        ValueError,
        "The 'epochs' parameter of Trainer.fit must be an int >= 1. Got True instead.",
        (),
    ),
    "epochs 0": (
        lambda t: t.fit(X, Y, epochs=0),
        ValueError,
        "The 'epochs' parameter of Trainer.fit must be an int >= 1. Got 0 instead.",
        (),
    ),
    "epochs -1": (
        lambda t: t.fit(X, Y, epochs=-1),
        ValueError,
        "The 'epochs' parameter of Trainer.fit must be an int >= 1. Got -1 instead.",
        (),
    ),
    "no epochs": (
        lambda t: t.fit(X, Y),
        ValueError,
        "Trainer.fit needs exactly one of 'epochs' (additional epochs), 'until_epoch' "
        "(the absolute target) and 'steps' (optimizer steps). Got epochs=None, "
        "until_epoch=None, steps=None.",
        (),
    ),
    "epochs and until_epoch": (
        lambda t: t.fit(X, Y, epochs=1, until_epoch=3),
        ValueError,
        "Trainer.fit needs exactly one of 'epochs' (additional epochs), 'until_epoch' "
        "(the absolute target) and 'steps' (optimizer steps). Got epochs=1, "
        "until_epoch=3, steps=None.",
        (),
    ),
    "until_epoch 0": (
        lambda t: t.fit(X, Y, until_epoch=0),
        ValueError,
        "The 'until_epoch' parameter of Trainer.fit must be an int >= 1. Got 0 instead.",
        (),
    ),
    "steps 0": (
        lambda t: t.fit(X, Y, steps=0),
        ValueError,
        "The 'steps' parameter of Trainer.fit must be an int >= 1. Got 0 instead.",
        (),
    ),
    "steps 2.0": (
        lambda t: t.fit(X, Y, steps=2.0),
        ValueError,
        "The 'steps' parameter of Trainer.fit must be an int >= 1. Got 2.0 instead.",
        (),
    ),
    "rounds and epochs": (
        lambda t: t.fit(X, Y, epochs=1, rounds=1),
        ValueError,
        "Pass either 'rounds' or 'epochs' (they mean the same), not both.",
        (),
    ),
    "mode 'resume'": (
        lambda t: t.fit(X, Y, epochs=1, mode="resume"),
        ValueError,
        "The 'mode' parameter of Trainer.fit must be one of {'continue', 'warm', "
        "'restart'}. Got 'resume' instead.",
        (),
    ),
    "mode None": (
        lambda t: t.fit(X, Y, epochs=1, mode=None),
        ValueError,
        "The 'mode' parameter of Trainer.fit must be one of {'continue', 'warm', "
        "'restart'}. Got None instead.",
        (),
    ),
    # -- evaluate / predict --------------------------------------------------------------
    "evaluate 5 features": (
        lambda t: t.evaluate(X[:, :5], Y),
        ValueError,
        fit_data("evaluate:", "(64, 5) torch.float32", Y64, torch_error(X[:, :5], Y)),
        (),
    ),
    "evaluate 0 rows": (
        lambda t: t.evaluate(X[:0], Y[:0]),
        ValueError,
        "x has no samples: nothing to train on.",
        (),
    ),
    "evaluate lengths differ": (
        lambda t: t.evaluate(X, Y[:3]),
        ValueError,
        "x and y must have the same number of samples. Got 64 rows in x and 3 in y.",
        (),
    ),
    "evaluate strings": (
        lambda t: t.evaluate(X.astype(str), Y),
        TypeError,
        "x must be numeric (a numpy array or torch tensor). Got dtype <U32.",
        (),
    ),
    "evaluate batch_size -1": (
        lambda t: t.evaluate(X, Y, batch_size=-1),
        ValueError,
        "The 'batch_size' parameter of Trainer.evaluate must be an int >= 1. Got -1 instead.",
        (),
    ),
    "evaluate batch_size 0": (
        lambda t: t.evaluate(X, Y, batch_size=0),
        ValueError,
        "The 'batch_size' parameter of Trainer.evaluate must be an int >= 1. Got 0 instead.",
        (),
    ),
    "predict 5 features": (
        lambda t: t.predict(X[:, :5]),
        ValueError,
        fit_data("predict:", "(64, 5) torch.float32", "None", torch_error(X[:, :5], target=False)),
        (),
    ),
    "predict 1-D": (
        lambda t: t.predict(X[:, 0]),
        ValueError,
        fit_data("predict:", "(64,) torch.float32", "None", torch_error(X[:, 0], target=False)),
        (),
    ),
    "predict 0 rows": (
        lambda t: t.predict(X[:0]),
        ValueError,
        "x has no samples: nothing to train on.",
        (),
    ),
    "predict strings": (
        lambda t: t.predict(X.astype(str)),
        TypeError,
        "x must be numeric (a numpy array or torch tensor). Got dtype <U32.",
        (),
    ),
    "predict batch_size -1": (
        lambda t: t.predict(X, batch_size=-1),
        ValueError,
        "The 'batch_size' parameter of Trainer.predict must be an int >= 1. Got -1 instead.",
        (),
    ),
    "predict batch_size 2.5": (
        lambda t: t.predict(X, batch_size=2.5),
        ValueError,
        "The 'batch_size' parameter of Trainer.predict must be an int >= 1. Got 2.5 instead.",
        (),
    ),
}

# -- the Trainer's constructor ------------------------------------------------------------
CTOR: dict[str, tuple[dict[str, Any], type, str]] = {
    "seed -1": (
        {"seed": -1},
        ValueError,
        "The 'seed' parameter of Trainer must be an int >= 0. Got -1 instead.",
    ),
    "seed 1.5": (
        {"seed": 1.5},
        ValueError,
        "The 'seed' parameter of Trainer must be an int >= 0. Got 1.5 instead.",
    ),
    "seed '1'": (
        {"seed": "1"},
        ValueError,
        "The 'seed' parameter of Trainer must be an int >= 0. Got '1' instead.",
    ),
    "batch_size 0": (
        {"batch_size": 0},
        ValueError,
        "The 'batch_size' parameter of Trainer must be an int >= 1. Got 0 instead.",
    ),
    "batch_size 16.0": (
        {"batch_size": 16.0},
        ValueError,
        "The 'batch_size' parameter of Trainer must be an int >= 1. Got 16.0 instead.",
    ),
    "batch_size True": (
        {"batch_size": True},
        ValueError,
        "The 'batch_size' parameter of Trainer must be an int >= 1. Got True instead.",
    ),
    "batch_size '16'": (
        {"batch_size": "16"},
        ValueError,
        "The 'batch_size' parameter of Trainer must be an int >= 1. Got '16' instead.",
    ),
    "checkpoint_every 0": (
        {"checkpoint_every": 0},
        ValueError,
        "The 'checkpoint_every' parameter of Trainer must be an int >= 1. Got 0 instead.",
    ),
    "monitor_mode 'up'": (
        {"monitor_mode": "up"},
        ValueError,
        "The 'monitor_mode' parameter of Trainer must be one of {'min', 'max'}. Got 'up' instead.",
    ),
    "loss 'hinge'": (
        {"loss": "hinge"},
        ValueError,
        "The 'loss' parameter of Trainer must be a callable or one of {",  # a set: prefix
    ),
    "loss 3": (
        {"loss": 3},
        TypeError,
        "The 'loss' parameter of Trainer must be callable. Got 3 instead.",
    ),
    "metric 'f1'": (
        {"metrics": ["f1"]},
        ValueError,
        "Unknown metric 'f1'. Expected one of {'accuracy'} or a callable.",
    ),
    "optimizer 3": (
        {"optimizer": 3},
        TypeError,
        "The 'optimizer' parameter of Trainer must be a factory params -> torch.optim.Optimizer, "
        "e.g. lambda params: torch.optim.Adam(params, lr=1e-3), so that 'warm' and 'restart' can "
        "build a fresh one. Got 3 instead.",
    ),
    "model 3": (
        {"model": 3},
        TypeError,
        "The 'model' parameter of Trainer must be a torch.nn.Module or a zero-argument "
        "factory returning one. Got 3 instead.",
    ),
    "model factory returns 3": (
        {"model": lambda: 3},
        TypeError,
        "The model factory must return a torch.nn.Module. Got 3.",
    ),
}


def _params(table: dict) -> list:
    return [
        pytest.param(*row[:3], id=name, marks=row[3] if len(row) > 3 else ())
        for name, row in table.items()
    ]


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize(("call", "error", "message"), _params(CASES))
def test_bad_input_to_fit_evaluate_predict(call, error, message):
    t = make_trainer()
    try:
        result = call(t)
    except Exception as exc:
        err = exc
    else:
        raise AssertionError(f"no error; returned {result!r:.80}")
    assert type(err) is error, f"{type(err).__name__}: {err}"
    assert str(err) == message


@pytest.mark.parametrize(("kwargs", "error", "message"), _params(CTOR))
def test_bad_input_to_the_trainer(kwargs, error, message):
    with pytest.raises(error) as err:
        make_trainer(**kwargs)
    assert type(err.value) is error
    if message.endswith("{"):  # the rest names a set, in an order that varies: see below
        assert str(err.value).startswith(message), str(err.value)
    else:
        assert str(err.value) == message


def test_the_loss_names_are_all_in_the_message():
    with pytest.raises(ValueError) as err:
        make_trainer(loss="hinge")
    head, _, rest = str(err.value).partition("{")
    names, _, tail = rest.partition("}")
    assert head == "The 'loss' parameter of Trainer must be a callable or one of "
    assert sorted(names.split(", ")) == sorted(
        ["'mse'", "'cross_entropy'", "'l1'", "'nll'", "'bce_with_logits'"]
    )
    assert tail == ". Got 'hinge' instead."


def test_keep_last_0_with_a_run_dir(tmp_path):
    with pytest.raises(ValueError) as err:
        make_trainer(run_dir=tmp_path, keep_last=0)
    assert str(err.value) == (
        "The 'keep_last' parameter of RunDir must be an int >= 1 or None. Got 0 instead."
    )


def test_a_failed_fit_does_not_poison_the_next_one():
    t = make_trainer()
    with pytest.raises(ValueError) as err:
        t.fit(X[:, :5], Y, epochs=1)
    assert str(err.value) == fit_data(
        "fit:", "(64, 5) torch.float32", Y64, torch_error(X[:, :5], Y)
    )
    try:
        t.fit(X, Y, epochs=1)
    except ValueError as err:
        raise AssertionError(str(err)) from None
    assert t.epoch == 1 and t.counters.fit_calls == 1


# --------------------------------------------------------------------------- CLI


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "warmfit", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )


def test_cli_unknown_command():
    p = cli("bogus")
    assert p.returncode == 2
    assert "warmfit: error: argument command: invalid choice: 'bogus'" in p.stderr


def test_cli_inspect_missing_checkpoint(tmp_path):
    p = cli("inspect", str(tmp_path / "nope"))
    assert p.returncode == 1
    assert p.stderr == f"warmfit inspect: {tmp_path / 'nope'}: missing: no checkpoint folder here\n"


def test_cli_verify_missing_run_dir(tmp_path):
    p = cli("verify", str(tmp_path / "nope"))
    assert p.returncode == 1, p.stdout
    assert p.stderr == (
        f"warmfit verify: {tmp_path / 'nope'} is not a run directory (no checkpoints/ folder "
        "in it). Pass the run_dir a Trainer or `warmfit train` wrote.\n"
    )


def test_cli_train_missing_spec(tmp_path):
    p = cli("train", str(tmp_path / "nope.toml"))
    assert p.returncode == 1
    assert p.stderr == (
        f"warmfit train: spec {tmp_path / 'nope.toml'}: no such file. Pass the path of a TOML "
        "spec file.\n"
    )


def test_cli_train_bad_mode(tmp_path):
    p = cli("train", "spec.toml", "--mode", "resume")
    assert p.returncode == 2
    assert "argument --mode: invalid choice: 'resume'" in p.stderr


def test_cli_train_bad_epochs(tmp_path):
    p = cli("train", "spec.toml", "--epochs", "0")
    assert p.returncode == 2
    assert p.stderr.splitlines()[-1] == (
        "warmfit train: error: argument --epochs: expected an integer >= 1, got 0"
    )


def test_cli_train_spec_with_a_wrong_type(tmp_path):
    spec = tmp_path / "s.toml"
    spec.write_text(
        'model = "m:f"\ndata = "m:d"\noptimizer = "m:o"\nloss = "mse"\nbatch_size = "64"\n'
    )
    p = cli("train", str(spec))
    assert p.returncode == 1
    assert p.stderr == f"warmfit train: spec {spec}: 'batch_size' must be an int >= 1, got '64'\n"


def test_cli_train_spec_not_toml(tmp_path):
    spec = tmp_path / "s.toml"
    spec.write_text("model = \n")
    p = cli("train", str(spec))
    assert p.returncode == 1
    # tomllib's own words follow
    assert p.stderr.startswith(f"warmfit train: spec {spec}: not valid TOML: "), p.stderr
    assert len(p.stderr.splitlines()) == 1 and "Traceback" not in p.stderr
