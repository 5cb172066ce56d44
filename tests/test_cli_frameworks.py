"""`warmfit train` and `warmfit check-resume` for every framework: the Keras and
scikit-learn example specs trained in split commands and stopped by SIGTERM and run
again (real subprocesses, a real signal), each ending in the very state of one
uninterrupted command; the framework named or inferred; and the spec's refusals of what
a framework cannot use, each with its message, before a Trainer is built."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import assert_same_state, require
from warmfit.backends import FRAMEWORKS
from warmfit.checkpoint import read_checkpoint
from warmfit.cli import main
from warmfit.rundir import RunDir
from warmfit.spec import load_spec

require("keras", reason="keras 3 is not installed: the Keras example cannot be tested")
require("sklearn", reason="scikit-learn is not installed: its example cannot be tested")

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
#: The example specs, and the framework each one's checkpoints record.
SPECS = {"keras_mlp": "keras/torch", "sklearn_sgd": "sklearn"}
# The examples' modules on PYTHONPATH, for the spec copies written elsewhere; Keras on
# its torch backend (what keras_mlp.py chooses too when nothing is set).
ENV = dict(
    os.environ,
    OMP_NUM_THREADS="1",
    KERAS_BACKEND=os.environ.get("KERAS_BACKEND") or "torch",
    PYTHONPATH=os.pathsep.join([str(EXAMPLES), os.environ.get("PYTHONPATH", "")]),
)


def warmfit(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "warmfit", *map(str, args)], cwd=cwd, env=ENV,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def train(spec: Path, run: Path, *args: str) -> subprocess.CompletedProcess:
    done = warmfit("train", spec, "--run-dir", run.name, "--verbose", "0", *args, cwd=run.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def final(run: Path) -> Path:
    latest = RunDir(run).latest()
    assert latest is not None
    return latest


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("name", sorted(SPECS))
def test_two_commands_of_2_epochs_end_where_one_of_4_ends(tmp_path, name):
    spec = EXAMPLES / f"{name}.toml"
    train(spec, tmp_path / "straight", "--epochs", "4")
    for _ in range(2):  # the first call finished, so the second trains 2 more epochs
        train(spec, tmp_path / "split", "--epochs", "2")
    ledger = jsonl(tmp_path / "split" / "ledger.jsonl")
    assert [(r["call"], r["epoch_start"], r["epochs_done"]) for r in ledger] == [
        (0, 0, 2),
        (1, 2, 2),
    ]
    state = read_checkpoint(final(tmp_path / "split"))[1]
    assert state["settings"]["model"]["framework"] == SPECS[name]
    assert state["counters"]["epoch"] == 4
    assert_same_state(final(tmp_path / "straight"), final(tmp_path / "split"), ledger=False)


PAUSE = """\
import time
from pathlib import Path

import warmfit


class Pause(warmfit.Callback):
    \"\"\"After the optimizer step `at`, while a file `pause` lies next to this module:
    writes `paused` there and waits (at most 60 s) until `release` appears.\"\"\"

    def __init__(self, at):
        self.at = at

    def on_step_end(self, trainer, step):
        here = Path(__file__).parent
        if step.step == self.at and (here / "pause").exists():
            (here / "paused").write_text(str(step.step))
            deadline = time.monotonic() + 60
            while not (here / "release").exists() and time.monotonic() < deadline:
                time.sleep(0.01)
"""


@pytest.mark.parametrize("name", sorted(SPECS))
def test_sigterm_mid_epoch_and_the_same_command_again_end_where_one_run_ends(tmp_path, name):
    # The example with a callback that holds step 25 (inside epoch 2 for both: 18 and 23
    # steps an epoch) while `pause` exists; the reference run has it too, never paused.
    (tmp_path / "pause_at.py").write_text(PAUSE)
    spec = tmp_path / f"{name}.toml"
    spec.write_text(
        (EXAMPLES / f"{name}.toml").read_text()
        + '\ncallbacks = [{ name = "pause_at:Pause", at = 25 }]\n'
    )
    train(spec, tmp_path / "straight", "--epochs", "4")

    (tmp_path / "pause").touch()
    argv = [sys.executable, "-m", "warmfit", "train", str(spec), "--run-dir", "killed",
            "--verbose", "0", "--epochs", "4"]  # fmt: skip
    proc = subprocess.Popen(
        argv, cwd=tmp_path, env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 120
    while not (tmp_path / "paused").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the training never reached step 25"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)  # inside step 25's callback: acted on once it returns
    time.sleep(0.3)
    (tmp_path / "pause").unlink()
    (tmp_path / "release").touch()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    name_25 = final(tmp_path / "killed").name
    assert name_25.endswith("-step-000000000025")  # the step boundary right after the signal
    assert err.splitlines()[-1] == (
        f"warmfit train: training stopped by SIGTERM at global step 25: checkpoint written to "
        f"killed/checkpoints/{name_25}. Run the same command again (or construct the Trainer "
        "on the same run_dir and repeat the same fit call) to finish this call exactly where "
        "it would have ended, at epoch 4; a call with other arguments starts anew from step 25."
    )

    again = train(spec, tmp_path / "killed", "--epochs", "4")  # the requeue: the same command
    assert "warmfit: resumed from killed/checkpoints/" + name_25 in again.stdout
    ledger = jsonl(tmp_path / "killed" / "ledger.jsonl")
    assert [(r["call"], r.get("resumes_call"), r["step_start"]) for r in ledger] == [
        (0, None, 0),
        (1, 0, 25),  # the second row finishes call 0, in its segment
    ]
    assert ledger[0]["stopped_by"] == "SIGTERM"
    assert_same_state(final(tmp_path / "straight"), final(tmp_path / "killed"), ledger=False)


@pytest.mark.parametrize(("name", "steps", "cuts"), [("keras_mlp", 36, "18, 9"),
                                                     ("sklearn_sgd", 46, "23, 12")])  # fmt: skip
def test_check_resume_is_exact_on_each_example(tmp_path, name, steps, cuts):
    done = warmfit("check-resume", EXAMPLES / f"{name}.toml", "--steps", str(steps), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines() == [
        "exact",
        f"{steps} steps straight == k steps, save, load into a fresh Trainer, {steps} - k "
        f"steps (k = {cuts}): weights, optimizer state, counters, RNG streams, schedule, "
        "callbacks and history are bit-identical.",
    ]


# -- the framework: named or inferred, and what each one refuses ------------------------------

MODELS = """\
import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras
import numpy as np
import torch
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import SGDClassifier
from torch import nn

CALLS = {"torch_model": 0}


def torch_model():
    CALLS["torch_model"] += 1
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def keras_model():
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])


def sgd():
    return SGDClassifier(random_state=0)


def forest():
    return RandomForestClassifier(max_depth=3, random_state=0)


def not_a_model():
    return "a string"


def data():
    x = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
    return x, (x[:, 0] > 0).astype(np.int64)


def never_called():
    raise RuntimeError("the data factory was called: the refusal came too late")


def torch_adam(params):
    return torch.optim.Adam(params, lr=1e-2)


def keras_adam():
    return keras.optimizers.Adam(1e-2)


def keras_loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)
"""


def models(tmp_path: Path) -> str:
    """MODELS as a module named after the test's folder (no two tests share an imported
    module), next to the test's specs."""
    module = f"models_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{module}.py").write_text(MODELS)
    return module


def write_spec(tmp_path: Path, text: str) -> Path:
    """A spec whose references `m:...` name the module :func:`models` writes."""
    spec = tmp_path / "spec.toml"
    spec.write_text(text.replace('"m:', f'"{models(tmp_path)}:'))
    return spec


@pytest.mark.parametrize(
    ("text", "framework", "backend"),
    [
        ('model = "m:torch_model"\noptimizer = "m:torch_adam"\nloss = "cross_entropy"\n',
         "torch", "torch"),
        ('model = "m:keras_model"\noptimizer = "m:keras_adam"\nloss = "m:keras_loss"\n',
         "keras", "keras"),
        ('model = "m:sgd"\n', "sklearn", "sklearn"),
    ],
)  # fmt: skip
def test_the_framework_is_named_or_inferred_from_the_model(tmp_path, text, framework, backend):
    for named in ("", f'framework = "{framework}"\n'):
        spec = load_spec(write_spec(tmp_path, named + text + 'data = "m:data"\n'))
        assert spec.resolve_framework() == framework
        trainer = spec.build_trainer(verbose=0)
        assert trainer.backend.framework == backend
        data = spec.load_data()
        trainer.fit(data.x, data.y, epochs=1)
        assert trainer.epoch == 1


def test_the_factory_of_a_named_framework_is_called_by_the_trainer_alone(tmp_path):
    """Inferring the framework calls the model factory once; naming it spares that call."""
    text = 'model = "m:torch_model"\noptimizer = "m:torch_adam"\ndata = "m:data"\n'
    inferred = load_spec(write_spec(tmp_path, text))
    module = sys.modules.get(inferred.raw["model"].partition(":")[0])
    assert module is None  # nothing imported by loading the spec
    inferred.build_trainer(verbose=0)
    calls = sys.modules[inferred.raw["model"].partition(":")[0]].CALLS
    assert calls["torch_model"] == 2  # the inference, then the Trainer's seeded build
    inferred.build_trainer(verbose=0)
    assert calls["torch_model"] == 3  # the framework is kept: once per Trainer from now on
    load_spec(write_spec(tmp_path, 'framework = "torch"\n' + text)).build_trainer(verbose=0)
    assert calls["torch_model"] == 4


def test_estimators_per_round_grows_an_ensemble_by_that_many_a_round(tmp_path):
    spec = load_spec(write_spec(
        tmp_path, 'model = "m:forest"\ndata = "m:data"\nestimators_per_round = 3\n'))  # fmt: skip
    trainer = spec.build_trainer(verbose=0)
    data = spec.load_data()
    trainer.fit(data.x, data.y, epochs=2)
    assert len(trainer.model.estimators_) == 6


ALL = ", ".join(map(repr, FRAMEWORKS))
TORCH_ADAM = "def adam(params): return torch.optim.Adam(params, lr=1e-3)"
KERAS_ADAM = "def adam(): return keras.optimizers.Adam(1e-3)"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # a Keras spec with a torch-style optimizer factory, named and inferred
        ('framework = "keras"\nmodel = "m:keras_model"\noptimizer = "m:torch_adam"\n',
         "'optimizer' names 'm:torch_adam', which takes (params): for a Keras model "
         "(framework = 'keras') it must be a factory () -> keras.optimizers.Optimizer, e.g. "
         f"{KERAS_ADAM}"),
        ('model = "m:keras_model"\noptimizer = "m:torch_adam"\n',
         "'optimizer' names 'm:torch_adam', which takes (params): for a Keras model "
         "(inferred from what the model factory returned: Sequential) it must be a factory "
         f"() -> keras.optimizers.Optimizer, e.g. {KERAS_ADAM}"),
        # and the other way round, and none at all for torch
        ('model = "m:torch_model"\noptimizer = "m:keras_adam"\n',
         "'optimizer' names 'm:keras_adam', which takes no argument: for a PyTorch model "
         "(inferred from what the model factory returned: Sequential) it must be a factory "
         f"params -> torch.optim.Optimizer, e.g. {TORCH_ADAM}"),
        ('model = "m:torch_model"\nloss = "mse"\n',
         "'optimizer' is missing; add optimizer = 'module:function', a factory params -> "
         "torch.optim.Optimizer: a PyTorch model needs one (inferred from what the model "
         f"factory returned: Sequential), e.g. {TORCH_ADAM}"),
        # a scikit-learn spec with an optimizer or a loss
        ('model = "m:sgd"\noptimizer = "m:torch_adam"\n',
         "'optimizer' is for PyTorch and Keras models; this spec's model is a scikit-learn "
         "estimator (inferred from what the model factory returned: SGDClassifier). Remove "
         "'optimizer'. A scikit-learn estimator has its own optimizer: set it through the "
         "estimator's parameters in the model factory, e.g. SGDClassifier(learning_rate="
         "'constant', eta0=0.01)."),
        ('framework = "sklearn"\nmodel = "m:sgd"\nloss = "log_loss"\n',
         "'loss' is for PyTorch and Keras models; this spec's model is a scikit-learn "
         "estimator (framework = 'sklearn'). Remove 'loss'. A scikit-learn estimator has its "
         "own loss: set it through the estimator's parameters in the model factory, e.g. "
         "SGDClassifier(loss='log_loss')."),
        # the torch step's keys elsewhere, and a scikit-learn key elsewhere
        ('model = "m:keras_model"\noptimizer = "m:keras_adam"\nprecision = "bf16"\n',
         "'precision' is an option of the PyTorch training step; this spec's model is a Keras "
         "model (inferred from what the model factory returned: Sequential). Remove "
         "'precision'."),
        ('model = "m:keras_model"\noptimizer = "m:keras_adam"\nstep = "m:torch_adam"\n',
         "'step' is for PyTorch models; this spec's model is a Keras model (inferred from "
         "what the model factory returned: Sequential). Remove 'step'. A Keras "
         "model takes its own step: override train_step in a keras.Model subclass, and "
         "warmfit runs it."),
        ('model = "m:sgd"\naccumulate = 2\n',
         "'accumulate' is an option of the PyTorch training step; this spec's model is a "
         "scikit-learn estimator (inferred from what the model factory returned: "
         "SGDClassifier). Remove 'accumulate'."),
        ('model = "m:torch_model"\noptimizer = "m:torch_adam"\nestimators_per_round = 2\n',
         "'estimators_per_round' is for scikit-learn estimators that grow by rounds "
         "(RandomForest*, ExtraTrees*, GradientBoosting*, HistGradientBoosting*, Bagging*); "
         "this spec's model is a PyTorch model (inferred from what the model factory returned: "
         "Sequential). Remove 'estimators_per_round'."),
        # an unknown framework
        ('framework = "jax"\nmodel = "m:torch_model"\n',
         f"'framework' must be one of {{{ALL}}} or left out, got 'jax'"),
        # a framework that does not match what the model factory returns (a PyTorch or
        # Keras model is built once, by the Trainer: checked then, after the data is read)
        ('framework = "keras"\nmodel = "m:torch_model"\ndata = "m:data"\n',
         "'framework' is 'keras', but the model factory 'm:torch_model' returned a Sequential, "
         "a PyTorch model. Set framework = 'torch', or remove 'framework' "
         "to infer it from the model."),
        ('framework = "torch"\nmodel = "m:keras_model"\noptimizer = "m:torch_adam"\n'
         'data = "m:data"\n',
         "'framework' is 'torch', but the model factory 'm:keras_model' returned a Sequential, "
         "a Keras model. Set framework = 'keras', or remove 'framework' to "
         "infer it from the model."),
        ('framework = "torch"\nmodel = "m:sgd"\noptimizer = "m:torch_adam"\ndata = "m:data"\n',
         "'framework' is 'torch', but the model factory 'm:sgd' returned a SGDClassifier, a "
         "scikit-learn estimator. Set framework = 'sklearn', or remove 'framework' to infer "
         "it from the model."),
        ('framework = "sklearn"\nmodel = "m:keras_model"\n',
         "'framework' is 'sklearn', but the model factory 'm:keras_model' returned a "
         "Sequential, a Keras model. Set framework = 'keras', or remove "
         "'framework' to infer it from the model."),
        ('framework = "keras"\nmodel = "m:not_a_model"\ndata = "m:data"\n',
         "'framework' is 'keras', but the model factory 'm:not_a_model' returned a str, which "
         "is not a Keras model. Return one from the factory, or set 'framework' "
         "to the model's framework."),
        # a model of no framework warmfit knows
        ('model = "m:not_a_model"\n',
         "'model' names 'm:not_a_model', which returned a str: warmfit cannot tell its "
         "framework. Return a torch.nn.Module, a keras.Model or a scikit-learn estimator from "
         f"it, or name its framework: framework = one of {ALL}."),
    ],
)  # fmt: skip
def test_what_the_framework_cannot_use_is_refused_by_name_before_anything_is_built(
    tmp_path, capsys, text, message
):
    if "data =" not in text:
        text += 'data = "m:never_called"\n'  # refused before the data is read
    spec = write_spec(tmp_path, text)
    run = tmp_path / "run"
    assert main(["train", str(spec), "--run-dir", str(run), "--epochs", "1"]) == 1
    message = message.replace("'m:", f"'{models(tmp_path)}:")
    assert capsys.readouterr().err == f"warmfit train: spec {spec}: {message}\n"
    assert not run.exists()  # no Trainer was built
