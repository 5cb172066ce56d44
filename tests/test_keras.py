"""Keras 3 models under warmfit's contract: modes, bit-exact split calls (E1), a new
process resuming from a run dir (E2), dropout's streams (E4), and the seed's scenario
replayed against plain ``model.fit``."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import (
    assert_latest_checkpoint_is_the_state,
    assert_same_state,
    make_data,
    require,
    with_fresh_optimizer,
)

keras = require("keras", reason="keras 3 is not installed: the Keras backend cannot be tested")

import warmfit  # noqa: E402
from warmfit import schedules  # noqa: E402
from warmfit.checkpoint import read_checkpoint  # noqa: E402

TESTS = Path(__file__).resolve().parent
STEPS_PER_EPOCH = 13  # 200 samples, batches of 16


def mlp(seed: int = 3, p: float = 0.3) -> keras.Model:
    """A small MLP with an unseeded Dropout (on torch: torch's global stream)."""
    keras.utils.set_random_seed(seed)  # the instance's initial weights
    return keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dropout(p),
            keras.layers.Dense(3),
        ]
    )


def xent() -> keras.losses.Loss:
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def keras_settings() -> dict[str, Any]:
    """The Trainer arguments of the Keras tests' reference run (all but the model)."""
    return dict(
        optimizer=lambda: keras.optimizers.Adam(1e-2),
        loss=xent(),
        metrics=["accuracy"],
        schedule=schedules.warmup(5, schedules.cosine(1e-2, horizon=60)),
        batch_size=16,
        seed=7,
        verbose=0,
    )


def make_keras_trainer(**kwargs: Any) -> warmfit.Trainer:
    defaults = keras_settings()
    defaults.update(kwargs)
    model = defaults.pop("model", None) or mlp()
    return warmfit.Trainer(model, **defaults)


@pytest.fixture
def data() -> tuple[np.ndarray, np.ndarray]:
    return make_data()


# -- E1, E4 ------------------------------------------------------------------------------
@pytest.mark.parametrize("split", [(1, 3), (3, 1)])
def test_e1_split_calls_equal_one_call(data, split):
    x, y = data
    xv, yv = make_data(60, seed=9)
    straight = make_keras_trainer()
    straight.fit(x, y, epochs=sum(split), validation_data=(xv, yv))
    parts = make_keras_trainer()
    for e in split:
        parts.fit(x, y, epochs=e, validation_data=(xv, yv))
    assert_same_state(straight, parts)
    assert [r["segment"] for r in parts.history] == [0] * split[0] + [1] * split[1]
    assert parts.global_step == 4 * STEPS_PER_EPOCH
    tensors = parts.state_dict()["tensors"]
    assert int(tensors["optim/iteration"]) == 4 * STEPS_PER_EPOCH
    assert tensors["optim/iteration"].shape == ()  # 0-d stays 0-d
    assert "model/seed_generator/seed_generator_state" in tensors  # SeedGenerator states
    assert "val_loss" in parts.history[-1] and "val_accuracy" in parts.history[-1]


def test_e1_mid_epoch_steps_and_validation_split(data):
    x, y = data
    straight = make_keras_trainer()
    straight.fit(x, y, epochs=2, validation_split=0.2)
    parts = make_keras_trainer()
    parts.fit(x, y, steps=7, validation_split=0.2)
    parts.fit(x, y, until_epoch=2, validation_split=0.2)
    assert_same_state(straight, parts)


def test_e1_with_a_keras_schedule_on_the_optimizer(data):
    """A Keras LearningRateSchedule follows the optimizer's iteration counter, which is
    part of the state: it continues on ``continue`` and starts again on ``warm``."""
    x, y = data

    def trainer(**kwargs) -> warmfit.Trainer:
        decay = keras.optimizers.schedules.ExponentialDecay(1e-2, decay_steps=5, decay_rate=0.5)
        return make_keras_trainer(
            optimizer=lambda: keras.optimizers.Adam(decay), schedule=None, **kwargs
        )

    straight = trainer()
    straight.fit(x, y, epochs=3)
    parts = trainer()
    parts.fit(x, y, epochs=2)
    parts.fit(x, y, epochs=1)
    assert_same_state(straight, parts)
    assert parts.learning_rate == pytest.approx(1e-2 * 0.5 ** (3 * STEPS_PER_EPOCH / 5))
    parts.fit(x, y, epochs=1, mode="warm")
    assert parts.learning_rate == pytest.approx(1e-2 * 0.5 ** (STEPS_PER_EPOCH / 5))
    with pytest.raises(
        TypeError,
        match="is a keras LearningRateSchedule; a warmfit schedule cannot also set it. Pass "
        "schedule=None",
    ):
        parts.fit(x, y, epochs=1, schedule=schedules.constant(1e-3))
    with pytest.raises(
        TypeError,
        match="is a keras LearningRateSchedule; ReduceLROnPlateau cannot also set it. Drop "
        "ReduceLROnPlateau, or give the optimizer a float learning rate.",
    ):
        trainer(callbacks=[warmfit.ReduceLROnPlateau()])


def test_e4_dropout_stream_is_owned_and_matters(data):
    """Unseeded Dropout draws from torch's global stream on the torch backend: the
    trainer owns it (the caller's draws between calls change nothing, and fit leaves the
    caller's stream alone), and it is real randomness (another seed, other weights)."""
    import torch

    x, y = data
    a = make_keras_trainer()
    a.fit(x, y, epochs=2)
    b = make_keras_trainer()
    b.fit(x, y, epochs=1)
    torch.rand(7), keras.random.normal((3,)), np.random.rand(5)  # the caller draws
    torch.manual_seed(0)
    before = torch.get_rng_state()
    b.fit(x, y, epochs=1)
    assert torch.equal(before, torch.get_rng_state()), "fit must not perturb the caller"
    assert_same_state(a, b)
    other = make_keras_trainer(seed=8)
    other.fit(x, y, epochs=2)
    wa, wo = a.state_dict()["tensors"], other.state_dict()["tensors"]
    assert np.array_equal(
        wa["initial/sequential/dense/kernel"], wo["initial/sequential/dense/kernel"]
    )
    assert not np.array_equal(
        wa["model/sequential/dense/kernel"], wo["model/sequential/dense/kernel"]
    )


def test_fit_does_not_perturb_callers_streams(data):
    import random

    import torch

    x, y = data
    t = make_keras_trainer()
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    t.fit(x, y, epochs=1)
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1])
    assert expected[2] == got[2]


def test_evaluate_and_predict_do_not_touch_training_state(data):
    x, y = data
    a = make_keras_trainer()
    a.fit(x, y, epochs=1)
    out = a.evaluate(x, y)
    assert set(out) == {"loss", "accuracy"} and 0.0 <= out["accuracy"] <= 1.0
    assert a.predict(x).shape == (200, 3)
    a.fit(x, y, epochs=1)
    b = make_keras_trainer()
    b.fit(x, y, epochs=2)
    assert_same_state(a, b)


# -- E2 ----------------------------------------------------------------------------------
WORKER = """
import sys
sys.path.insert(0, {tests!r})
from conftest import make_data
from test_keras import make_keras_trainer

x, y = make_data()
xv, yv = make_data(60, seed=9)
trainer = make_keras_trainer(run_dir=sys.argv[1])
print("started at epoch", trainer.epoch, flush=True)
trainer.fit(x, y, until_epoch=int(sys.argv[2]), validation_data=(xv, yv))
trainer.save(sys.argv[3])
trainer.close()
"""


def test_e2_new_process_resumes_from_run_dir(tmp_path, data):
    x, y = data
    xv, yv = make_data(60, seed=9)
    straight = make_keras_trainer()
    straight.fit(x, y, epochs=4, validation_data=(xv, yv))
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER.format(tests=str(TESTS))))
    env = dict(os.environ, KERAS_BACKEND="torch", OMP_NUM_THREADS="1")
    run = tmp_path / "run"
    for until, started in ((2, 0), (4, 2)):
        proc = subprocess.run(
            [sys.executable, str(script), str(run), str(until), str(tmp_path / f"out{until}")],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        assert f"started at epoch {started}" in proc.stdout
    assert "warmfit: resumed from" in proc.stdout
    tensors, _ = read_checkpoint(tmp_path / "out4")
    assert tensors["optim/iteration"].shape == ()
    assert_same_state(tmp_path / "out4", straight)


def test_save_load_in_process_then_continue(tmp_path, data):
    x, y = data
    straight = make_keras_trainer()
    straight.fit(x, y, epochs=3)
    first = make_keras_trainer()
    first.fit(x, y, epochs=1)
    first.save(tmp_path / "ck")
    second = warmfit.Trainer.load(
        tmp_path / "ck",
        mlp(seed=99),  # other initial values: the checkpoint overwrites them all
        **keras_settings(),
    )
    second.fit(x, y, epochs=2)
    assert_same_state(straight, second)


def test_checkpoint_of_other_architecture_names_the_keys(tmp_path, data):
    x, y = data
    t = make_keras_trainer()
    t.fit(x, y, epochs=1)
    t.save(tmp_path / "ck")
    wider = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(32, activation="relu"), keras.layers.Dense(3)]
    )
    with pytest.raises(warmfit.StateMismatchError) as err:
        warmfit.Trainer.load(
            tmp_path / "ck",
            wider,
            optimizer=lambda: keras.optimizers.Adam(1e-2),
            loss=xent(),
            batch_size=16,
            seed=7,
        )
    msg = str(err.value)
    assert msg.startswith(
        "the checkpoint does not match the model: unexpected in the checkpoint: "
        "['seed_generator/seed_generator_state'] | shape mismatch: "
    )
    assert "sequential/dense/kernel: checkpoint [8, 16] vs model [8, 32]" in msg


# -- modes ---------------------------------------------------------------------------------
def test_warm_keeps_weights_fresh_optimizer_and_schedule(data):
    x, y = data
    t = make_keras_trainer()
    t.fit(x, y, epochs=2)
    old_opt = t.optimizer
    t.fit(x, y, epochs=1, mode="warm")
    assert t.optimizer is not old_opt and t.model.optimizer is t.optimizer
    assert t.epoch == 3 and t.global_step == 3 * STEPS_PER_EPOCH
    assert int(t.state_dict()["tensors"]["optim/iteration"]) == STEPS_PER_EPOCH
    assert t.counters.schedule_origin == 2 * STEPS_PER_EPOCH
    assert [r["segment"] for r in t.history] == [0, 0, 1]
    # Reference, built by hand from the contract (not with the warm code path): the
    # state after 2 epochs with the optimizer of a Trainer that never trained and the
    # schedule's origin at the current step; then a plain continue call.
    ref = make_keras_trainer()
    ref.fit(x, y, epochs=2)
    ref.load_state_dict(with_fresh_optimizer(ref.state_dict(), make_keras_trainer().state_dict()))
    ref.fit(x, y, epochs=1)
    assert_same_state(t, ref)


def test_restart_equals_fresh_trainer(data):
    x, y = data
    t = make_keras_trainer()
    t.fit(x, y, epochs=2)
    t.fit(x, y, epochs=3, mode="restart")
    fresh = make_keras_trainer()
    fresh.fit(x, y, epochs=3)
    assert_same_state(t, fresh, differ=("counters.run",))
    assert t.counters.run == 1 and len(t.history) == 3
    assert [r["mode"] for r in t.ledger] == ["continue", "restart"]


def test_restart_with_model_factory_rebuilds_from_seed(data):
    # A factory cannot be recognised before it is called: it names its framework.
    x, y = data

    def factory() -> keras.Model:
        return keras.Sequential(
            [keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
             keras.layers.Dropout(0.3), keras.layers.Dense(3)]
        )  # fmt: skip

    keras.utils.set_random_seed(123)  # the caller's streams do not matter to the build
    t = make_keras_trainer(model=factory, framework="keras")
    keras.utils.set_random_seed(456)
    u = make_keras_trainer(model=factory, framework="keras")
    model = t.model
    t.fit(x, y, epochs=2)
    t.fit(x, y, epochs=2, mode="restart")
    u.fit(x, y, epochs=2)
    assert t.model is model  # restart keeps the user's object, with fresh values
    assert_same_state(t, u, differ=("counters.run",))
    assert "initial/sequential/dense/kernel" not in t.state_dict()["tensors"]

    def first_kernel(trainer: warmfit.Trainer) -> np.ndarray:
        return keras.ops.convert_to_numpy(trainer.model.variables[0])

    same = make_keras_trainer(model=factory, framework="keras")
    other = make_keras_trainer(model=factory, framework="keras", seed=8)
    again = make_keras_trainer(model=factory, framework="keras")
    assert np.array_equal(first_kernel(same), first_kernel(again))
    assert not np.array_equal(first_kernel(same), first_kernel(other))


def test_compiled_model_keeps_its_optimizer_loss_and_metrics(data):
    x, y = data
    model = mlp()
    sgd = keras.optimizers.SGD(0.05, momentum=0.9)
    model.compile(optimizer=sgd, loss=xent(), metrics=["accuracy"])
    t = warmfit.Trainer(model, batch_size=16, seed=7, verbose=0)
    assert t.optimizer is sgd
    t.fit(x, y, epochs=1, validation_data=(x[:50], y[:50]))
    assert "val_accuracy" in t.history[-1]
    assert t.learning_rate == np.float32(0.05)
    t.fit(x, y, epochs=1, mode="warm")
    # (on torch, keras.optimizers.SGD(...) is an instance of a torch subclass of SGD)
    assert t.optimizer is not sgd and isinstance(t.optimizer, keras.optimizers.SGD)
    assert t.optimizer.get_config()["momentum"] == 0.9 and t.learning_rate == np.float32(0.05)
    assert t.model.optimizer is t.optimizer
    assert "optim/sequential/dense/kernel/momentum" in t.state_dict()["tensors"]


# -- the seed's scenario: train, train again ---------------------------------------------
def test_train_again_continues_where_plain_keras_restarts(data):
    x, y = data

    def halving(epoch: int, lr: float = 0.0) -> float:
        return 1e-2 * 0.5**epoch

    # Plain Keras: the second fit() starts a new History at epoch 0, and the epoch-indexed
    # LearningRateScheduler goes back to its first value.
    model = mlp()
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=xent())
    cb = keras.callbacks.LearningRateScheduler(halving)
    first = model.fit(x, y, epochs=2, batch_size=16, callbacks=[cb], verbose=0)
    second = model.fit(x, y, epochs=2, batch_size=16, callbacks=[cb], verbose=0)
    assert first.epoch == [0, 1] and second.epoch == [0, 1]
    assert len(second.history["loss"]) == 2
    assert second.history["learning_rate"] == pytest.approx([1e-2, 5e-3])  # restarted

    # warmfit: the same schedule by global step; the second call goes on.
    def trainer() -> warmfit.Trainer:
        return make_keras_trainer(
            schedule=schedules.step_decay(1e-2, step_size=STEPS_PER_EPOCH, gamma=0.5)
        )

    t = trainer()
    t.fit(x, y, epochs=2)
    t.fit(x, y, epochs=2)
    assert t.epoch == 4 and t.global_step == 4 * STEPS_PER_EPOCH
    assert [r["segment"] for r in t.history] == [0, 0, 1, 1]
    assert [r["epoch"] for r in t.history] == [1, 2, 3, 4]
    # The lr of each epoch's last step: the halving goes on in the second call, where
    # plain Keras went back to 1e-2.
    lrs = [r["lr"] for r in t.history]
    assert lrs == pytest.approx([1e-2, 5e-3, 2.5e-3, 1.25e-3])
    assert lrs[2:] != pytest.approx(second.history["learning_rate"])
    straight = trainer()
    straight.fit(x, y, epochs=4)
    assert_same_state(t, straight)


# -- errors ----------------------------------------------------------------------------------
def test_unbuilt_model_and_missing_optimizer_are_explained():
    unbuilt = keras.Sequential([keras.layers.Dense(3)])
    with pytest.raises(ValueError, match=r"^The Keras model is not built"):
        warmfit.Trainer(unbuilt, optimizer=lambda: keras.optimizers.Adam(), loss=xent())
    with pytest.raises(ValueError, match=r"^The Keras model is not compiled and no optimizer"):
        warmfit.Trainer(mlp())
    with pytest.raises(ValueError, match=r"^The Keras model has no loss"):
        warmfit.Trainer(mlp(), optimizer=lambda: keras.optimizers.Adam())


def nan_data(data: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Rows 100 on NaN: in order, the seventh batch (rows 96-111, global step 7) is the
    first with a NaN."""
    x, y = data
    x = x.copy()
    x[100:] = np.nan
    return x, y


def last_good_step(x: np.ndarray, y: np.ndarray) -> warmfit.Trainer:
    """The reference: the same call, stopped by steps= at the last good step (6)."""
    ref = make_keras_trainer(schedule=None)
    ref.fit(x, y, steps=6, shuffle=False)
    return ref


def test_nan_loss_stops_before_the_step(data):
    """The weights, optimizer, counters and partial epoch of the last good step (6): the
    whole state of a run stopped there by steps=, but for the call in progress (this
    one failed, that one finished) and torch's stream, which the failed step's forward
    pass drew from (as the message says: it is not rewound)."""
    x, y = nan_data(data)
    t = make_keras_trainer(schedule=None)
    with pytest.raises(warmfit.NonFiniteLossError) as err:
        t.fit(x, y, epochs=1, shuffle=False)
    assert str(err.value) == "the loss became nan at global step 7 (epoch 0). Training stopped before that step's update: the trainer holds the weights, optimizer and counters after step 6 (the failed step's forward pass has drawn from the random streams). Lower the learning rate, or check the data for NaN/inf."
    for v in t.model.variables:
        assert np.isfinite(keras.ops.convert_to_numpy(v)).all(), v.path
    assert_same_state(t, last_good_step(x, y), differ=("call", "rng/torch_cpu"))
    assert t.state_dict()["state"]["call"]["call"] == 0  # the failed call is still open



# -- bad input: the probe ------------------------------------------------------------------
def named_mlp() -> keras.Model:
    """``mlp`` with named layers: Keras's own error text names the layer."""
    keras.utils.set_random_seed(3)
    return keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, activation="relu", name="hidden"),
            keras.layers.Dropout(0.3),
            keras.layers.Dense(3, name="logits"),
        ],
        name="net",
    )


FIT_DATA = "The data does not fit the model or the loss: "
SPEC = "expected x (None, 8) float32 (the model's input), got "
CHECK = " Check the number of features, the dtypes, and that y matches the loss."
FIVE = (
    "On its first rows ValueError: Input 0 with name 'None' of layer 'hidden' is "
    "incompatible with the layer: expected axis -1 of input shape to have value 8, but "
    "received input with shape (2, 5)."
)
X5 = "x (200, 5) float32"
BAD_DATA = {
    "x has 5 features (restart)": (
        lambda t, x, y: t.fit(x[:, :5], y, epochs=1, mode="restart"),
        f"{FIT_DATA}fit: {SPEC}{X5}, y (200,) int64. {FIVE}{CHECK}",
    ),
    "y one-hot for a sparse loss (warm)": (
        lambda t, x, y: t.fit(x, np.eye(3, dtype="float32")[y], epochs=1, mode="warm"),
        f"{FIT_DATA}fit: {SPEC}x (200, 8) float32, y (200, 3) float32. On its first rows "
        "ValueError: Arguments `target` and `output` must have the same shape up until the "
        "last dimension: target.shape=torch.Size([2, 3]), output.shape=torch.Size([2, 3])."
        f"{CHECK}",
    ),
    "y missing": (
        lambda t, x, y: t.fit(x, None, epochs=1),
        f"{FIT_DATA}fit: {SPEC}x (200, 8) float32, y None. On its first rows ValueError: "
        f"Invalid dtype: object.{CHECK}",
    ),
    "validation x has 5 features": (
        lambda t, x, y: t.fit(x, y, epochs=1, validation_data=(x[:, :5], y)),
        f"{FIT_DATA}validation: {SPEC}{X5}, y (200,) int64. {FIVE}{CHECK}",
    ),
    "evaluate x has 5 features": (
        lambda t, x, y: t.evaluate(x[:, :5], y),
        f"{FIT_DATA}evaluate: {SPEC}{X5}, y (200,) int64. {FIVE}{CHECK}",
    ),
    "predict x has 5 features": (
        lambda t, x, y: t.predict(x[:, :5]),
        f"{FIT_DATA}predict: {SPEC}{X5}, y None. {FIVE}{CHECK}",
    ),
}


@pytest.mark.parametrize("case", BAD_DATA, ids=list(BAD_DATA))
@pytest.mark.filterwarnings("ignore:The training data changed")  # y=None: another fingerprint
def test_bad_data_is_refused_before_anything_changes(data, case):
    """Wrong features, labels that do not fit the loss, missing labels: warmfit's error,
    naming the call, what the model expects and what it got, before the mode is applied
    and before any stream moves (the trainer's or the caller's)."""
    import random

    import torch

    x, y = data
    call, message = BAD_DATA[case]
    t = make_keras_trainer(model=named_mlp())
    t.fit(x, y, epochs=1)
    before, calls = t.state_dict(), len(t.ledger)
    caller = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    with pytest.raises(ValueError) as err:
        call(t, x, y)
    assert str(err.value) == message
    assert_same_state(before, t, ledger=True)
    assert len(t.ledger) == calls and t.epoch == 1
    assert random.getstate() == caller[0] and _same_numpy_state(np.random.get_state(), caller[1])
    assert torch.equal(torch.get_rng_state(), caller[2])
    t.fit(x, y, epochs=1)  # and the trainer goes on as if nothing had happened
    straight = make_keras_trainer(model=named_mlp())
    straight.fit(x, y, epochs=2)
    assert_same_state(t, straight)


def _same_numpy_state(a: tuple, b: tuple) -> bool:
    """NumPy's legacy global state: the key array and the position in it (and the rest)."""
    return a[0] == b[0] and np.array_equal(a[1], b[1]) and a[2:] == b[2:]


class Restless(keras.layers.Layer):
    """Changes state on every call, in inference mode too: its own SeedGenerator, Keras's
    global seed generator, torch's and NumPy's global streams and a non-trainable counter."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seed_generator = keras.random.SeedGenerator(11)

    def build(self, input_shape: Any) -> None:
        self.calls = self.add_weight(shape=(), initializer="zeros", trainable=False, name="calls")

    def call(self, x: Any, training: bool = False) -> Any:
        import torch

        self.calls.assign_add(1.0)
        shape = keras.ops.shape(x)
        noise = keras.random.normal(shape, seed=self.seed_generator) + keras.random.normal(shape)
        return x + 1e-3 * noise + 1e-3 * torch.rand(()) + 1e-3 * float(np.random.rand())


def restless_mlp() -> keras.Model:
    keras.utils.set_random_seed(3)
    return keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.BatchNormalization(),
            Restless(),
            keras.layers.Dropout(0.3),
            keras.layers.Dropout(0.2, seed=5),
            keras.layers.Dense(3),
        ]
    )


def test_the_probe_changes_no_state(data):
    """A trainer that probed (three times per data set) and then trained is bit for bit
    the one that never probed, with a layer that draws from every stream and counts its
    calls even in inference mode; and a probe leaves the caller's streams alone."""
    import random

    import torch

    x, y = data
    xv, yv = make_data(60, seed=9)
    probed = make_keras_trainer(model=restless_mlp())
    plain = make_keras_trainer(model=restless_mlp())
    backend, probe, seen = probed._backend, probed._backend.check_data, []

    def probe_thrice(data: Any, **kwargs: Any) -> None:
        seen.append(kwargs["what"])
        for _ in range(3):
            probe(data, **kwargs)

    backend.check_data = probe_thrice
    plain._backend.check_data = lambda data, **kwargs: None  # a backend without a probe
    for t in (probed, plain):
        t.fit(x, y, epochs=1, validation_data=(xv, yv))
        t.fit(x, y, steps=5, validation_data=(xv, yv))
    assert seen == ["fit:", "validation:"] * 2
    assert_same_state(probed, plain)

    # The layer does change state when called (what the probe puts back)...
    model = restless_mlp()
    kernels = {v.path: np.array(keras.ops.convert_to_numpy(v)) for v in model.variables}
    model(x[:2], training=False)
    changed = [
        v.path
        for v in model.variables
        if not np.array_equal(keras.ops.convert_to_numpy(v), kernels[v.path])
    ]
    assert [p.split("/")[-1] for p in changed] == ["calls", "seed_generator_state"]
    # ... and the caller's streams stay put: with no global seed generator yet (Keras
    # would make one from a seed drawn from Python's stream) and with one.
    for has_global in (False, True):
        if has_global:
            keras.random.normal((1,))
        else:
            backend.install_rng({"keras_global": np.zeros(0)})
        before = (random.getstate(), np.random.get_state(), backend.capture_rng())
        probe(backend.prepare(x, y), with_target=True, what="fit:")
        after = (random.getstate(), np.random.get_state(), backend.capture_rng())
        assert before[0] == after[0] and _same_numpy_state(before[1], after[1])
        assert before[2]["keras_global"].size == (2 if has_global else 0)
        assert sorted(before[2]) == sorted(after[2]) == ["keras_global", "torch_cpu"]
        for k in before[2]:
            assert np.array_equal(before[2][k], after[2][k]), k
        assert torch.equal(torch.from_numpy(after[2]["torch_cpu"]), torch.get_rng_state())


class Subclassed(keras.Model):
    def __init__(self) -> None:
        super().__init__(name="subclassed")
        self.out = keras.layers.Dense(3, name="out")

    def call(self, x: Any) -> Any:
        return self.out(x)


@pytest.mark.filterwarnings("ignore:`build\\(\\)` was called on layer 'subclassed'")
def test_probe_of_a_subclassed_model(data):
    """No input spec to quote: the message says what was received. ``build(shape)`` of a
    subclassed model does not build its layers: the probe finds the variables the first
    call creates, which the optimizer would not know."""
    x, y = data
    unbuilt = Subclassed()
    unbuilt.build((None, 8))
    t = make_keras_trainer(model=unbuilt)
    with pytest.raises(ValueError) as err:
        t.fit(x, y, epochs=1)
    assert str(err.value) == (
        "The Keras model is not fully built: expected no new variables when it is called, "
        "got ['subclassed/out/kernel', 'subclassed/out/bias'] on fit: x (200, 8) float32. "
        "Build every layer before handing the model to warmfit: give it a keras.Input, or "
        "call it once on a batch (model(x[:1]))."
    )
    model = Subclassed()
    model(x[:1])
    t = make_keras_trainer(model=model)
    with pytest.raises(ValueError) as err:
        t.fit(x[:, :5], y, epochs=1)
    assert str(err.value) == (
        f"{FIT_DATA}fit: {X5}, y (200,) int64. On its first rows ValueError: Input 0 with "
        "name 'None' of layer 'out' is incompatible with the layer: expected axis -1 of input shape to "
        f"have value 8, but received input with shape (2, 5).{CHECK}"
    )
    t.fit(x, y, epochs=1)
    assert t.global_step == STEPS_PER_EPOCH


# -- deterministic= ----------------------------------------------------------------------
def test_set_deterministic_turns_torch_algorithms_on_and_back():
    """The backend's half of ``deterministic=True``: the Keras ops are torch ops, so
    torch's switch applies; the caller's setting (warn_only included) comes back."""
    import torch

    backend = make_keras_trainer()._backend
    try:
        for before, warn_only in ((False, False), (True, True)):
            torch.use_deterministic_algorithms(before, warn_only=warn_only)
            undo = backend.set_deterministic()
            assert torch.are_deterministic_algorithms_enabled()
            assert not torch.is_deterministic_algorithms_warn_only_enabled()
            undo()
            assert torch.are_deterministic_algorithms_enabled() is before
            assert torch.is_deterministic_algorithms_warn_only_enabled() is warn_only
    finally:
        torch.use_deterministic_algorithms(False)


DETERMINISTIC_ELSEWHERE = (
    "Trainer(deterministic=True) is supported for Keras on the torch backend only. "
    "Expected KERAS_BACKEND='torch', got 'jax'. Turn determinism on yourself (TensorFlow: "
    "tf.config.experimental.enable_op_determinism(); JAX: "
    "XLA_FLAGS=--xla_gpu_deterministic_ops=true before jax starts) and pass "
    "deterministic=False, or use KERAS_BACKEND=torch."
)


def test_check_deterministic_refuses_other_keras_backends(monkeypatch):
    backend = make_keras_trainer()._backend
    backend.check_deterministic()  # torch: fine
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    backend.torch = False
    with pytest.raises(ValueError) as err:
        backend.check_deterministic()
    assert str(err.value) == DETERMINISTIC_ELSEWHERE


class DeterministicProbe(warmfit.callbacks.Callback):
    """Records whether torch's deterministic algorithms are on inside a fit call."""

    def __init__(self) -> None:
        self.seen: list[bool] = []

    def on_fit_start(self, trainer: warmfit.Trainer, mode: str) -> None:
        import torch

        self.seen.append(torch.are_deterministic_algorithms_enabled())

    def on_epoch_end(self, trainer: warmfit.Trainer, logs: dict[str, Any]) -> None:
        self.on_fit_start(trainer, "")


def test_deterministic_true_is_honoured_during_fit(data):
    import torch

    x, y = data
    probe = DeterministicProbe()
    t = make_keras_trainer(deterministic=True, callbacks=[probe])
    assert not torch.are_deterministic_algorithms_enabled()
    t.fit(x, y, epochs=2)
    assert probe.seen == [True, True, True]
    assert not torch.are_deterministic_algorithms_enabled()  # the caller's setting is back
    assert t.ledger[-1]["deterministic"] is True
    off = DeterministicProbe()
    plain = make_keras_trainer(callbacks=[off])  # on the CPU the same bits either way
    plain.fit(x, y, epochs=2)
    assert off.seen == [False, False, False]
    assert_same_state(t, plain)


def test_deterministic_true_on_other_keras_backends_is_refused_at_construction(monkeypatch):
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    with pytest.raises(ValueError) as err:
        make_keras_trainer(deterministic=True)
    assert str(err.value) == DETERMINISTIC_ELSEWHERE


def test_background_checkpoints_use_reused_host_buffers(tmp_path, data):
    """On Keras's torch backend a save copies the variables' tensors into the reused
    buffers of HostSnapshot (not one convert_to_numpy per variable): the state bit for
    bit, dtypes and 0-d shapes kept, never aliasing the live variables."""
    from warmfit.backends.torch import HostSnapshot

    x, y = data
    t = make_keras_trainer(run_dir=tmp_path / "run", checkpoint_every=2)
    t.fit(x, y, epochs=1)
    backend = t._backend
    assert isinstance(backend._snapshot, HostSnapshot)  # fit's saves made it
    live = backend.state_tensors()
    snapshot = backend.snapshot_tensors()
    assert sorted(snapshot) == sorted(live)
    for name, arr in live.items():
        assert snapshot[name].dtype == arr.dtype and snapshot[name].shape == arr.shape, name
        assert snapshot[name].tobytes() == arr.tobytes(), name  # byte for byte
        if not name.startswith("initial/"):  # replaced, never written in place
            assert not np.shares_memory(snapshot[name], arr), name
    again = backend.snapshot_tensors()
    assert all(np.shares_memory(again[k], snapshot[k]) for k in snapshot)
    assert_latest_checkpoint_is_the_state(t)
    t.close()
