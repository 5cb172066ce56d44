"""The PyTorch Trainer: modes, bit-exact split continuation (E1, E4, E5), guardrails."""

from __future__ import annotations

import os
import pickle
import random
import signal
import warnings

import numpy as np
import pytest
import torch

import warmfit
from conftest import (
    MLP,
    adam,
    assert_latest_checkpoint_is_the_state,
    assert_same_state,
    make_data,
    make_trainer,
    with_fresh_optimizer,
)
from warmfit import schedules


class RecordingDataset(torch.utils.data.Dataset):
    """A map-style dataset that records which indices were read."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x, self.y = torch.from_numpy(x), torch.from_numpy(y)
        self.seen: list[int] = []

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        self.seen.append(i)
        return self.x[i], self.y[i]


@pytest.mark.parametrize("split", [(1, 5), (3, 3), (5, 1)])
def test_e1_split_calls_equal_one_call_arrays(data, split):
    x, y = data
    xv, yv = make_data(60, seed=9)
    straight = make_trainer()
    straight.fit(x, y, epochs=sum(split), validation_data=(xv, yv))
    parts = make_trainer()
    for e in split:
        parts.fit(x, y, epochs=e, validation_data=(xv, yv))
    assert_same_state(straight, parts)
    assert [r["segment"] for r in parts.history] == [0] * split[0] + [1] * split[1]
    assert parts.epoch == straight.epoch == 6
    assert parts.global_step == straight.global_step == 6 * 13


def test_e1_batches_are_the_same_rows_for_strided_tensors(data):
    """Contiguous tensors are batched with index_select, others with x[idx]: both give
    the rows of the epoch's order, and a strided x trains to the same bits split and
    straight, and batch for batch the same rows as a contiguous copy."""
    x, y = data
    strided = torch.from_numpy(np.asfortranarray(x))
    assert not strided.is_contiguous()
    backend = make_trainer()._backend
    order = np.random.default_rng(0).permutation(len(x))
    for xs in (torch.from_numpy(x), strided):
        batches = list(backend.batches(backend.prepare(xs, y), order, 20, 16, 0))
        assert [len(b[0]) for b in batches] == [16] * 11 + [4]
        for i, (xb, yb) in enumerate(batches):
            rows = order[20 + 16 * i : 36 + 16 * i]
            assert torch.equal(xb, torch.from_numpy(x[rows]))
            assert torch.equal(yb, torch.from_numpy(y[rows]))
    assert list(backend.batches(backend.prepare(strided, y), order, len(x), 16, 0)) == []
    straight = make_trainer()
    straight.fit(strided, y, epochs=2)
    parts = make_trainer()
    parts.fit(strided, y, steps=7)
    parts.fit(strided, y, until_epoch=2)
    assert_same_state(straight, parts)


def test_e1_split_calls_equal_one_call_dataset(data):
    x, y = data
    straight = make_trainer()
    straight.fit(RecordingDataset(x, y), epochs=4, validation_split=0.2)
    parts = make_trainer()
    ds = RecordingDataset(x, y)
    parts.fit(ds, epochs=1, validation_split=0.2)
    parts.fit(ds, epochs=3, validation_split=0.2)
    assert_same_state(straight, parts)


def test_e1_with_torch_lr_scheduler(data):
    x, y = data

    def sched(opt):
        return torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5)

    a = make_trainer(schedule=sched)
    a.fit(x, y, epochs=4)
    b = make_trainer(schedule=sched)
    b.fit(x, y, epochs=1)
    b.fit(x, y, epochs=3)
    assert_same_state(a, b)
    assert a.learning_rate == 1e-2 * 0.5 ** (a.global_step // 7)


def test_e4_dropout_draws_from_owned_stream(data):
    """Dropout makes two calls differ; the trainer's own stream makes split == straight:
    the whole state, with the caller seeding and drawing from torch's global stream
    between the calls, and fit leaves the caller's stream as it was."""
    x, y = data
    straight = make_trainer()
    straight.fit(x, y, epochs=2)
    t = make_trainer()
    t.fit(x, y, epochs=1)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    t.fit(x, y, epochs=1)
    assert torch.equal(before, torch.get_rng_state()), "fit must not perturb the caller's stream"
    assert_same_state(straight, t)
    # the dropout draws matter: without dropout, other weights (so the above is not vacuous)
    plain = make_trainer(model=lambda: MLP(p=0.0))
    plain.fit(x, y, epochs=2)
    w, w0 = straight.state_dict()["tensors"], plain.state_dict()["tensors"]
    assert w["model/net.0.weight"].tobytes() != w0["model/net.0.weight"].tobytes()


def test_e1_caller_code_between_calls_cannot_perturb(data):
    x, y = data
    a = make_trainer()
    a.fit(x, y, epochs=3)
    b = make_trainer()
    b.fit(x, y, epochs=1)
    torch.rand(1000), np.random.rand(77), random.random()  # the caller draws in between
    b.fit(x, y, epochs=2)
    assert_same_state(a, b)


def test_e5_validation_never_perturbs_training(data):
    x, y = data
    xv, yv = make_data(60, seed=9)
    with_val = make_trainer()
    with_val.fit(x, y, epochs=3, validation_data=(xv, yv))
    without = make_trainer()
    without.fit(x, y, epochs=3)
    # the whole state, bit for bit; the history differs by the validation values alone
    state = with_val.state_dict()
    history = state["state"]["history"]
    state["state"]["history"] = [{k: v for k, v in r.items() if k[:4] != "val_"} for r in history]
    assert_same_state(state, without)
    assert "val_loss" in with_val.history[-1] and "val_accuracy" in with_val.history[-1]


def test_restart_equals_fresh_trainer(data):
    x, y = data
    t = make_trainer()
    t.fit(x, y, epochs=2)
    t.fit(x, y, epochs=3, mode="restart")
    fresh = make_trainer()
    fresh.fit(x, y, epochs=3)
    assert_same_state(t, fresh, differ=("counters.run",))
    assert t.counters.run == 1 and len(t.history) == 3
    assert [r["mode"] for r in t.ledger] == ["continue", "restart"]


def test_restart_with_model_instance_equals_fresh(data):
    x, y = data
    torch.manual_seed(3)
    model = MLP()
    torch.manual_seed(3)
    same_model = MLP()
    t = make_trainer(model=model)
    t.fit(x, y, epochs=2)
    t.fit(x, y, epochs=2, mode="restart")
    fresh = make_trainer(model=same_model)
    fresh.fit(x, y, epochs=2)
    assert_same_state(t, fresh, differ=("counters.run",))


def test_warm_keeps_weights_fresh_optimizer_and_schedule(data):
    x, y = data
    t = make_trainer()
    t.fit(x, y, epochs=2)
    weights = {k: v.clone() for k, v in t.model.state_dict().items()}
    old_opt = t.optimizer
    t.fit(x, y, epochs=1, mode="warm")
    assert t.optimizer is not old_opt
    assert t.epoch == 3 and t.global_step == 39
    assert t.counters.schedule_origin == 26
    assert [r["segment"] for r in t.history] == [0, 0, 1]
    # Reference, built by hand from the contract (not with the warm code path): the
    # state after 2 epochs with the optimizer of a Trainer that never trained (the
    # factory's fresh one) and the schedule's origin moved to the current step; then a
    # plain continue call, which trains the epoch-2 data order from there.
    ref = make_trainer()
    ref.fit(x, y, epochs=2)
    ref.load_state_dict(with_fresh_optimizer(ref.state_dict(), make_trainer().state_dict()))
    ref.fit(x, y, epochs=1)
    assert_same_state(t, ref)
    assert not all(torch.equal(weights[k], v) for k, v in t.model.state_dict().items())


def test_state_dict_roundtrip_into_new_trainer_then_continue(data):
    x, y = data
    straight = make_trainer()
    straight.fit(x, y, epochs=5, validation_split=0.25)
    first = make_trainer()
    first.fit(x, y, epochs=2, validation_split=0.25)
    sd = first.state_dict()
    second = make_trainer()
    second.load_state_dict(sd)
    second.fit(x, y, epochs=3, validation_split=0.25)
    assert_same_state(straight, second)


def test_load_state_dict_keeps_no_reference_to_the_callers_arrays(data):
    x, y = data
    straight = make_trainer()
    straight.fit(x, y, epochs=3)
    first = make_trainer()
    first.fit(x, y, epochs=1)
    sd = first.state_dict()
    second = make_trainer()
    second.load_state_dict(sd)
    for a in sd["tensors"].values():
        a[...] = 0  # the caller reuses its arrays: the trainer must not see it
    second.fit(x, y, epochs=2)
    assert_same_state(straight, second)


def test_until_epoch_is_absolute(data):
    x, y = data
    t = make_trainer()
    t.fit(x, y, until_epoch=2)
    t.fit(x, y, until_epoch=5)
    assert t.epoch == 5
    with pytest.raises(
        ValueError,
        match=r"until_epoch=5 is at or below the current epoch 5: no training would occur",
    ):
        t.fit(x, y, until_epoch=5)


def test_fit_call_schedule_replaces_and_is_recorded(data):
    x, y = data
    t = make_trainer()
    t.fit(x, y, epochs=1)
    t.fit(x, y, epochs=1, schedule=schedules.constant(1e-4))
    assert t.learning_rate == 1e-4
    assert t.ledger[-1]["changes"]["schedule"]["to"] == {"kind": "Constant", "lr": 1e-4}
    assert t.ledger[-1]["mode"] == "continue"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            dict(epochs=0),
            "The 'epochs' parameter of Trainer.fit must be an int >= 1. Got 0 instead.",
        ),
        (
            dict(epochs=-2),
            "The 'epochs' parameter of Trainer.fit must be an int >= 1. Got -2 instead.",
        ),
        (
            dict(epochs=1, mode="resum"),
            "The 'mode' parameter of Trainer.fit must be one of {'continue', 'warm', 'restart'}. Got 'resum' instead.",
        ),
        (
            dict(),
            "Trainer.fit needs exactly one of 'epochs' (additional epochs), 'until_epoch' (the absolute target) and 'steps' (optimizer steps). Got epochs=None, until_epoch=None, steps=None.",
        ),
        (dict(epochs=1, until_epoch=3), "Trainer.fit needs exactly one of 'epochs'"),
    ],
)
def test_bad_arguments_raise_before_anything_changes(data, kwargs, message):
    x, y = data
    t = make_trainer()
    before = t.state_dict()
    with pytest.raises(ValueError) as err:
        t.fit(x, y, **kwargs)
    assert str(err.value).startswith(message)
    assert_same_state(before, t, ledger=True)


def test_mismatched_lengths(data):
    x, y = data
    t = make_trainer()
    with pytest.raises(
        ValueError,
        match=r"^x and y must have the same number of samples. Got 200 rows in x and 199 in y.$",
    ):
        t.fit(x, y[:-1], epochs=1)


def test_continue_with_other_shape_raises_naming_both(data):
    x, y = data
    t = make_trainer()
    t.fit(x, y, epochs=1)
    with pytest.raises(ValueError) as err:
        t.fit(x[:150], y[:150], epochs=1)
    assert str(err.value).startswith(
        "The data of this 'continue' call has shape (150, 8), the previous call's had shape (200, 8)."
    )
    assert t.epoch == 1
    t.fit(x[:150], y[:150], epochs=1, mode="warm")  # allowed in warm mode
    assert t.epoch == 2


def test_continue_with_changed_data_warns_with_fingerprint(data):
    x, y = data
    t = make_trainer()
    t.fit(x, y, epochs=1)
    with pytest.warns(
        UserWarning,
        match=r"The training data changed since the previous fit call \(fingerprint [0-9a-f]{24}, was [0-9a-f]{24}\)",
    ):
        t.fit(x + 1.0, y, epochs=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t.fit(x + 1.0, y, epochs=1)


def test_changed_data_that_is_refused_does_not_warn_first(data):
    """Same shape, other values, and labels the loss cannot take: the call is refused
    with the probe's error alone, not a "data changed" warning and then an error."""
    x, y = data
    t = make_trainer()
    t.fit(x, y, epochs=1)
    bad = y.copy()
    bad[0] = 7  # 3 classes
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="The data does not fit the model or the loss: fit: x"):
            t.fit(x, bad, epochs=1)
    assert t.epoch == 1


def nan_run(trainer: warmfit.Trainer, x: np.ndarray, y: np.ndarray) -> warmfit.NonFiniteLossError:
    """6 clean steps (x[:96]), then a warm call on ``x`` in order: rows 96-111, the
    seventh batch (global step 6 + 7 = 13), hold the first NaN row (100)."""
    trainer.fit(x[:96], y[:96], epochs=1)
    with pytest.raises(warmfit.NonFiniteLossError) as err:
        trainer.fit(x, y, epochs=1, mode="warm", shuffle=False)
    return err.value


def last_good_step(x: np.ndarray, y: np.ndarray) -> warmfit.Trainer:
    """The reference: the same calls, the warm one stopped by steps= at the last good step."""
    ref = make_trainer(schedule=None)
    ref.fit(x[:96], y[:96], epochs=1)
    ref.fit(x, y, steps=6, mode="warm", shuffle=False)
    return ref


def nan_data(data: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    x, y = data
    x = x.copy()
    x[100:] = np.nan
    return x, y


def test_nan_loss_stops_and_keeps_last_good_state(data):
    """The weights, optimizer, counters, schedule and partial epoch of the last good step
    (step 12): the whole state of a run stopped there by steps=, but for the call in
    progress (this one failed, that one finished) and torch's stream, which the failed
    step's forward pass drew from (as the message says: it is not rewound)."""
    x, y = nan_data(data)
    t = make_trainer(schedule=None)
    err = nan_run(t, x, y)
    msg = str(err)
    assert msg == "the loss became nan at global step 13 (epoch 1). Training stopped before that step's update: the trainer holds the weights, optimizer and counters after step 12 (the failed step's forward pass has drawn from the random streams). Lower the learning rate, or check the data for NaN/inf."
    assert err.step == 13 and t.global_step == 12
    assert all(torch.isfinite(p).all() for p in t.model.parameters())
    assert_same_state(t, last_good_step(x, y), differ=("call", "rng/torch_cpu"))
    assert t.state_dict()["state"]["call"]["call"] == 1  # the failed call is still open



def test_bad_trainer_arguments():
    with pytest.raises(
        ValueError,
        match=r"^The 'batch_size' parameter of Trainer must be an int >= 1. Got 0 instead.$",
    ):
        make_trainer(batch_size=0)
    with pytest.raises(TypeError, match="must be a factory params -> torch.optim.Optimizer"):
        warmfit.Trainer(MLP(), optimizer=torch.optim.SGD(MLP().parameters(), lr=0.1), loss="mse")
    with pytest.raises(
        ValueError, match="The 'loss' parameter of Trainer must be a callable or one of"
    ):
        warmfit.Trainer(MLP(), optimizer=adam, loss="hinge")


def test_evaluate_and_predict_do_not_touch_training_state(data):
    x, y = data
    a = make_trainer()
    a.fit(x, y, epochs=1)
    out = a.evaluate(x, y)
    assert set(out) == {"loss", "accuracy"} and 0.0 <= out["accuracy"] <= 1.0
    pred = a.predict(x)
    assert pred.shape == (200, 3)
    a.fit(x, y, epochs=1)
    b = make_trainer()
    b.fit(x, y, epochs=2)
    assert_same_state(a, b)


def test_dataset_resume_reads_no_sample_before_offset(data):
    """E6: a resume mid-epoch (a real one: steps=, state_dict, a fresh Trainer) starts
    the epoch's order at the offset, nothing is replayed: the resumed call reads exactly
    the samples the uninterrupted run read after that point, and ends in its state."""
    x, y = data
    probes = [0, 100, 199]  # the data fingerprint reads the first, middle and last sample
    straight_ds = RecordingDataset(x, y)
    straight = make_trainer(schedule=None)
    straight.fit(straight_ds, epochs=2)
    assert straight_ds.seen[:3] == probes and len(straight_ds.seen) == 3 + 2 * 200
    t = make_trainer(schedule=None)
    t.fit(RecordingDataset(x, y), steps=13 + 10)  # 10 of 13 batches of epoch 1 done
    assert t.cursor == warmfit.data.Cursor(1, 160)
    u = make_trainer(schedule=None)
    u.load_state_dict(t.state_dict())
    ds = RecordingDataset(x, y)
    u.fit(ds, until_epoch=2)
    assert ds.seen == probes + straight_ds.seen[3 + 200 + 160 :]
    assert_same_state(straight, u)


@pytest.mark.parametrize("cut", [1, 7, 13, 20, 26])
def test_steps_stop_mid_epoch_and_continue_exactly(data, cut):
    x, y = data
    straight = make_trainer()
    straight.fit(x, y, epochs=3, validation_data=(x[:50], y[:50]))
    parts = make_trainer()
    parts.fit(x, y, steps=cut, validation_data=(x[:50], y[:50]))
    assert parts.global_step == cut
    assert parts.cursor == warmfit.data.Cursor(cut // 13, (cut % 13) * 16)
    parts.fit(x, y, until_epoch=3, validation_data=(x[:50], y[:50]))
    assert_same_state(straight, parts)


def test_deterministic_is_on_during_fit_only_and_the_callers_setting_comes_back(data):
    x, y = data
    seen: list[tuple[bool, bool]] = []

    class Probe(warmfit.callbacks.Callback):
        def on_epoch_end(self, trainer: warmfit.Trainer, logs: dict) -> None:
            seen.append(
                (
                    torch.are_deterministic_algorithms_enabled(),
                    torch.is_deterministic_algorithms_warn_only_enabled(),
                )
            )

    torch.use_deterministic_algorithms(False, warn_only=True)
    try:
        t = make_trainer(deterministic=True, callbacks=[Probe()])
        t.fit(x, y, epochs=2)
        assert seen == [(True, False), (True, False)]
        assert torch.are_deterministic_algorithms_enabled() is False
        assert torch.is_deterministic_algorithms_warn_only_enabled() is True
        assert t.ledger[-1]["deterministic"] is True
    finally:
        torch.use_deterministic_algorithms(False)


class NumpyNoiseMLP(MLP):
    """Draws from NumPy's and Python's global streams in forward (as some augmentation
    code does): the data probe must not advance them."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        noise = np.random.normal(scale=0.01, size=tuple(x.shape)).astype(np.float32)
        return super().forward(x + torch.from_numpy(noise) * random.random())


def test_the_data_probe_leaves_the_host_streams_as_they_were(data):
    """The probe runs before fit installs the trainer's streams: the caller's Python and
    NumPy streams must come out of fit as they went in, and split == straight."""
    x, y = data
    straight = make_trainer(model=NumpyNoiseMLP)
    straight.fit(x, y, epochs=3)
    parts = make_trainer(model=NumpyNoiseMLP)
    for _ in range(3):  # three probes instead of one
        np.random.seed(1)
        random.seed(1)
        parts.fit(x, y, epochs=1)
        assert (np.random.rand(), random.random()) == (
            np.random.RandomState(1).rand(),
            random.Random(1).random(),
        )
    assert_same_state(straight, parts)


# -- background snapshots -----------------------------------------------------------------
def test_host_snapshot_copies_into_reused_buffers() -> None:
    from warmfit.backends.torch import HostSnapshot

    w = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    h = torch.tensor([1.5, -2.0], dtype=torch.bfloat16)
    snap = HostSnapshot()
    first = snap.copy({"w": w, "h": h})
    w.add_(1)  # training goes on; the snapshot keeps the values it copied
    assert np.array_equal(first["w"], np.arange(6, dtype=np.float32).reshape(2, 3))
    assert not np.shares_memory(first["w"], w.numpy())
    assert first["h"].dtype == np.int16  # bfloat16 as its bits, like state_tensors
    assert np.array_equal(first["h"], h.view(torch.int16).numpy())
    second = snap.copy({"w": w})
    assert np.shares_memory(second["w"], first["w"])  # the same buffer, refilled
    assert np.array_equal(second["w"], w.numpy()) and snap.nbytes == w.nbytes  # 'h' dropped
    third = snap.copy({"w": torch.zeros(3, 3, dtype=torch.float64)})
    assert not np.shares_memory(third["w"], first["w"]) and third["w"].shape == (3, 3)
    assert not snap.pinned  # pinned only for tensors on a GPU


def test_background_checkpoints_use_the_backends_host_buffers(tmp_path) -> None:
    """The torch backend's snapshot is the state, bit for bit, in buffers that are reused
    from one save to the next and never alias the live tensors."""
    x, y = make_data(64)
    t = make_trainer(run_dir=tmp_path / "run", checkpoint_every=2)
    t.fit(x, y, epochs=1)
    backend = t._backend
    live = backend.state_tensors()
    assert backend._snapshot.nbytes == sum(a.nbytes for a in live.values())  # fit's saves
    snapshot = backend.snapshot_tensors()
    assert sorted(snapshot) == sorted(live)
    for name, arr in live.items():
        assert (snapshot[name].dtype, snapshot[name].shape) == (arr.dtype, arr.shape), name
        assert snapshot[name].tobytes() == arr.tobytes(), name  # byte for byte
        assert not np.shares_memory(snapshot[name], arr), name
    again = backend.snapshot_tensors()
    assert all(np.shares_memory(again[k], snapshot[k]) for k in snapshot)
    assert_latest_checkpoint_is_the_state(t)


# -- signals, the ledger and settings ------------------------------------------------------
class _SignalAt(warmfit.Callback):
    """Sends SIGTERM to this process at the end of epoch ``epoch`` (after its validation),
    as a scheduler's time limit would."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_end(self, trainer, logs):
        if logs["epoch"] == self.epoch:
            os.kill(os.getpid(), signal.SIGTERM)
        return None


@pytest.mark.parametrize("at_epoch", [1, 3])  # inside the call; after its last epoch
def test_a_signal_is_never_lost_and_the_interrupted_call_is_in_the_ledger(tmp_path, at_epoch):
    x, y = make_data()
    xv, yv = make_data(60, seed=9)
    with make_trainer(run_dir=tmp_path, callbacks=[_SignalAt(at_epoch)]) as t:
        with pytest.raises(warmfit.TrainingInterrupted, match="training stopped by SIGTERM"):
            t.fit(x, y, epochs=3, validation_data=(xv, yv))
        stopped_at = t.global_step
        assert t.ledger[-1]["stopped_by"] == "SIGTERM"
        assert t.ledger[-1]["step_end"] == stopped_at
    with make_trainer(run_dir=tmp_path, callbacks=[_SignalAt(0)]) as resumed:
        assert resumed.global_step == stopped_at
        assert [r["stopped_by"] for r in resumed.ledger] == ["SIGTERM"]  # saved with it
        resumed.fit(x, y, until_epoch=4, validation_data=(xv, yv))
        assert [r["call"] for r in resumed.ledger] == [0, 1]
    straight = make_trainer(callbacks=[_SignalAt(0)])
    straight.fit(x, y, epochs=4, validation_data=(xv, yv))
    assert_same_state(straight, resumed)


def test_load_state_dict_compares_settings_like_a_resume(data):
    x, y = data
    t = make_trainer(seed=0)
    t.fit(x, y, epochs=1)
    other = make_trainer(seed=1)
    with pytest.warns(
        UserWarning, match="resuming with different settings: seed: checkpoint 0, now 1"
    ):
        other.load_state_dict(t.state_dict())
    with pytest.raises(warmfit.StateMismatchError, match="seed: checkpoint 0, now 1"):
        other.fit(x, y, epochs=1)
    assert other.epoch == 1
    other.fit(x, y, epochs=1, mode="warm")  # allowed: a fresh optimizer, the data order of seed 1


def test_the_validation_split_stays_fixed_when_the_seed_changes(tmp_path, data):
    x, y = data
    with make_trainer(seed=0, run_dir=tmp_path) as t:
        t.fit(x, y, epochs=1, validation_split=0.25)
        val_rows = t.state_dict()["tensors"]["data/val_rows"]
    with make_trainer(seed=5, run_dir=tmp_path, override=("seed",)) as t2:
        t2.fit(x, y, epochs=1, validation_split=0.25)
        assert np.array_equal(t2.state_dict()["tensors"]["data/val_rows"], val_rows)
        t2.fit(x, y, epochs=1, validation_split=0.25, mode="restart")  # a new run: a new split
        assert not np.array_equal(t2.state_dict()["tensors"]["data/val_rows"], val_rows)


def test_an_optimizer_setting_that_differs_says_which_value_is_kept(tmp_path, data):
    x, y = data
    with make_trainer(run_dir=tmp_path, optimizer=lambda p: torch.optim.Adam(p, lr=1e-2)) as t:
        t.fit(x, y, epochs=1)
    with pytest.warns(UserWarning) as caught:
        t2 = make_trainer(
            run_dir=tmp_path,
            optimizer=lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=0.1),
        )
    message = str(caught[0].message)
    assert message.startswith(
        "resuming with different settings: optimizer.hyper[0].weight_decay: checkpoint 0, "
        "now 0.1. On 'continue' the optimizer keeps the checkpoint's hyper-parameters"
    )
    with t2:
        assert t2.optimizer.param_groups[0]["weight_decay"] == 0
        t2.fit(x, y, epochs=1, mode="warm")
        assert t2.optimizer.param_groups[0]["weight_decay"] == 0.1


class _SignalAtFitEnd(warmfit.Callback):
    def on_fit_end(self, trainer):
        os.kill(os.getpid(), signal.SIGTERM)  # as if it came during the closing save


def test_a_signal_during_the_closing_save_raises_after_the_save(tmp_path, data):
    x, y = data
    with make_trainer(run_dir=tmp_path, callbacks=[_SignalAtFitEnd()]) as t:
        with pytest.raises(warmfit.TrainingInterrupted) as err:
            t.fit(x, y, epochs=2)
        assert err.value.checkpoint == t.run_dir.latest()
        assert err.value.step == t.global_step == 26
        _, state = warmfit.checkpoint.read_checkpoint(err.value.checkpoint)
        assert state["counters"]["global_step"] == 26 and len(state["ledger"]) == 1


def test_warm_with_other_data_inside_an_epoch_starts_that_epoch_over(data):
    """The cursor's offset refers to the previous data's rows: a warm call on data of
    another length trains the epoch from its start instead of training nothing."""
    x, y = data
    t = make_trainer()
    t.fit(x, y, steps=5)  # offset 80 of 200
    t.fit(x[:50], y[:50], epochs=1, mode="warm")
    assert (t.epoch, t.cursor.offset, t.global_step) == (1, 0, 5 + 4)
    assert t.ledger[-1]["changes"]["cursor"] == {"epoch": 0, "offset": 80, "now": 0}
    assert t.history[-1]["loss"] is not None
    u = make_trainer()
    u.fit(x, y, steps=5)
    u.fit(x, y, epochs=1, mode="warm")  # the same data: the epoch is finished
    assert (u.epoch, u.global_step) == (1, 13) and "cursor" not in u.ledger[-1]["changes"]


def test_a_trainer_with_a_run_dir_cannot_be_copied(tmp_path, data):
    import copy

    x, y = data
    with make_trainer(run_dir=tmp_path) as t:
        t.fit(x, y, epochs=1)
        message = (
            f"A Trainer with a run_dir ({tmp_path}) cannot be copied or pickled: one Trainer "
            "at a time owns a run directory, so the copy could not save there. Copy a "
            "Trainer built without run_dir, or build a new Trainer and "
            "load_state_dict(trainer.state_dict()) into it."
        )
        for clone in (copy.deepcopy, pickle.dumps):
            with pytest.raises(TypeError) as err:
                clone(t)
            assert str(err.value) == message
        twin = make_trainer()
        twin.load_state_dict(t.state_dict())  # what the message suggests
        t.fit(x, y, epochs=1)
        twin.fit(x, y, epochs=1)
        assert_same_state(t, twin)
    # without a run_dir a pickle round trip is the same Trainer, and trains on the same
    pickled = pickle.loads(pickle.dumps(twin))
    assert_same_state(twin, pickled)
    twin.fit(x, y, epochs=1)
    pickled.fit(x, y, epochs=1)
    assert_same_state(twin, pickled)


def test_numpy_integers_are_taken_as_plain_ints(tmp_path, data):
    """NumPy integers (a grid of settings, a config read with NumPy) pass the checks and
    are stored as ints: the ledger and checkpoints take them, and training is the same."""
    x, y = data
    with make_trainer(
        batch_size=np.int64(16), seed=np.int64(7), checkpoint_every=np.int32(5),
        run_dir=tmp_path / "run", schedule=warmfit.schedules.cosine(np.float32(0.5), np.int64(40)),
    ) as t:  # fmt: skip
        t.fit(x, y, epochs=np.int64(1))
        t.fit(x, y, steps=np.uint8(3))
        t.fit(x, y, until_epoch=np.int16(3))
        assert type(t.batch_size) is int and type(t.seed) is int
        asked = ("epochs_asked", "steps_asked", "until_epoch")
        assert [type(r[k]) for r, k in zip(t.ledger, asked, strict=True)] == [int] * 3
        assert t.run_dir.latest() is not None
    ref = make_trainer(
        batch_size=16, seed=7, checkpoint_every=5, schedule=warmfit.schedules.cosine(0.5, 40)
    )
    ref.fit(x, y, epochs=1)
    ref.fit(x, y, steps=3)
    ref.fit(x, y, until_epoch=3)
    assert_same_state(t, ref)


def test_a_nan_seen_at_a_readout_raises_before_anything_is_saved(tmp_path, data):
    """Where the loss stays on the device (a GPU, DDP) it is read at saves and epoch ends
    (check_each_step off): a NaN raises there, naming its step, and no checkpoint after
    it is written."""
    x, y = data
    x = x.copy()
    x[100] = np.nan  # in order (no shuffle), batches of 16: in step 7
    with make_trainer(
        schedule=None, run_dir=tmp_path / "run", checkpoint_every=4, keep_last=None
    ) as t:
        t._backend.check_each_step = False  # as on a GPU
        with pytest.raises(warmfit.NonFiniteLossError) as err:
            t.fit(x, y, epochs=1, shuffle=False)
        e = err.value
        assert (e.step, e.seen_at, t.global_step) == (7, 8, 8)
        assert str(e) == (
            f"the loss became nan at global step {e.step} (epoch 0). It was read at step "
            f"{e.seen_at} (on a GPU or under DDP losses are read at saves and epoch ends): "
            "the trainer holds the state after that step, its weights possibly NaN, and "
            "nothing after the NaN was saved. Rewind to a checkpoint "
            "(trainer.rewind('latest')) before going on. Lower the learning rate, or check "
            "the data for NaN/inf."
        )
        saved = t.run_dir.checkpoints()  # fit raised once its saves were on disk
        assert [warmfit.checkpoint.read_state(p)["counters"]["global_step"] for p in saved] == [4]
        for path in saved:
            tensors, _ = warmfit.checkpoint.read_checkpoint(path)
            assert all(np.isfinite(v).all() for k, v in tensors.items() if k.startswith("model/"))
        t.rewind("latest")
        assert all(torch.isfinite(p).all() for p in t.model.parameters())
