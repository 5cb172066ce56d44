"""The torch training step's options — precision, accumulate, clip_grad_norm, ema —
bit-exact across split calls and checkpoints, with their state (scaler, EMA, epoch
statistics) in the checkpoint; and each refusal with its message."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import warmfit
from conftest import MLP, assert_same_state, make_data, make_trainer, state_of, trainer_settings
from warmfit.backends.torch_step import micro_batches
from warmfit.data import Cursor


@dataclass
class Out:
    logits: torch.Tensor
    loss: torch.Tensor | None = None


class TinyLM(nn.Module):
    """A causal one-block transformer on token ids, returning ``.loss`` (HF-style)."""

    def __init__(self, vocab: int = 11, width: int = 16, block: int = 8) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, width), nn.Embedding(block, width)
        self.attn = nn.MultiheadAttention(width, 2, dropout=0.1, batch_first=True)
        self.ln = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 32), nn.GELU(), nn.Dropout(0.1), nn.Linear(32, width))
        self.head = nn.Linear(width, vocab)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> Out:
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t))
        mask = torch.triu(torch.ones(t, t, dtype=torch.bool), 1)
        x = x + self.attn(x, x, x, attn_mask=mask, need_weights=False)[0]
        x = x + self.mlp(self.ln(x))
        logits = self.head(x)
        if targets is None:
            return Out(logits)
        return Out(logits, F.cross_entropy(logits.float().flatten(0, 1), targets.flatten()))


def lm_data(n: int = 72, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = rng.integers(0, 11, size=(n, 9))
    return {"idx": w[:, :-1].copy(), "targets": w[:, 1:].copy()}


def adamw(model: nn.Module) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest}], lr=3e-3)


LM = dict(
    optimizer=adamw,
    schedule=warmfit.schedules.warmup(4, warmfit.schedules.cosine(3e-3, horizon=40)),
    batch_size=12,
    seed=3,
    verbose=0,
    precision="bf16",
    accumulate=4,
    clip_grad_norm=1.0,
    ema=0.9,
    ema_warmup=True,
)


def lm_trainer(**kwargs) -> warmfit.Trainer:  # type: ignore[no-untyped-def]
    return warmfit.Trainer(TinyLM, **{**LM, **kwargs})


def test_every_option_on_split_calls_equal_one_call():
    x = lm_data()  # 72 windows, 6 steps per epoch, 4 micro-batches of 3 each
    straight = lm_trainer()
    straight.fit(x, epochs=2)
    split = lm_trainer()
    split.fit(x, epochs=1)
    split.fit(x, epochs=1)
    assert_same_state(straight, split, ledger=False)
    tensors = state_of(straight)["tensors"]
    assert any(k.startswith("ema/") for k in tensors)  # the EMA is in the state compared
    h = straight.history[-1]
    assert 0.0 < h["grad_norm"] <= h["grad_norm_max"]  # pre-clip norms, per epoch


def test_a_cut_inside_an_epoch_resumed_in_a_fresh_trainer_equals_straight(tmp_path):
    x = lm_data()
    straight = lm_trainer()
    straight.fit(x, epochs=2)
    first = lm_trainer()
    first.fit(x, steps=8)  # inside epoch 2: the EMA, the epoch's norms are mid-way
    first.save(tmp_path / "ck")
    resumed = warmfit.Trainer.load(tmp_path / "ck", TinyLM, **LM)
    resumed.fit(x, until_epoch=2)
    assert_same_state(straight, resumed, ledger=False)


def test_checkpoint_every_step_and_a_run_dir_resume(tmp_path):
    x = lm_data(48)
    straight = lm_trainer()
    straight.fit(x, epochs=2)
    crashed = lm_trainer(run_dir=tmp_path / "run", checkpoint_every=1)
    crashed.fit(x, steps=5)  # as a process killed after step 5's checkpoint
    crashed.close()
    resumed = lm_trainer(run_dir=tmp_path / "run", checkpoint_every=1)
    assert resumed.global_step == 5
    resumed.fit(x, until_epoch=2)
    assert_same_state(straight, resumed, ledger=False)


def test_accumulation_takes_the_same_samples_and_steps_within_float_tolerance():
    """fp32, no dropout, SGD: accumulate=4 computes the gradient of the same global
    batch's mean loss as accumulate=1, summed in another order; the data order, step
    count and cursor are identical. Measured: 1.5e-8 max after 26 steps (bound 1e-6)."""
    x, y = make_data(200)
    settings = {**trainer_settings(), "optimizer": lambda p: torch.optim.SGD(p, lr=0.1)}
    one = warmfit.Trainer(lambda: MLP(p=0.0), **settings)
    four = warmfit.Trainer(lambda: MLP(p=0.0), **settings, accumulate=4)
    one.fit(x, y, epochs=2)
    four.fit(x, y, epochs=2)
    assert (one.global_step, one.cursor) == (four.global_step, four.cursor) == (26, Cursor(2, 0))
    diffs = [
        (a - b).abs().max().item()
        for a, b in zip(one.model.state_dict().values(), four.model.state_dict().values(), strict=True)
    ]
    assert 0 < max(diffs) < 1e-6


def test_micro_batches_split_a_batch_as_numpy_array_split():
    assert micro_batches(16, 4) == [(0, 4), (4, 8), (8, 12), (12, 16)]
    assert micro_batches(10, 4) == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert micro_batches(2, 4) == [(0, 1), (1, 2)]
    assert micro_batches(2, 4, keep_empty=True) == [(0, 1), (1, 2), (2, 2), (2, 2)]


class Loud(MLP):
    """Outputs scaled up: the first fp16 steps' scaled gradients overflow, so the scaler
    skips them and backs off: its scale changes before the cut."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 3e3


def test_fp16_scaler_state_continues_across_a_resume(tmp_path):
    x, y = make_data(96)
    settings = {**trainer_settings(), "precision": "fp16", "schedule": None}
    straight = warmfit.Trainer(Loud, **settings)
    straight.fit(x, y, epochs=3)
    first = warmfit.Trainer(Loud, **settings)
    first.fit(x, y, steps=7)
    scale = first.backend.precision.scaler.get_scale()  # type: ignore[attr-defined]
    assert scale < 65536.0  # backed off before the cut
    first.save(tmp_path / "ck")
    resumed = warmfit.Trainer.load(tmp_path / "ck", Loud, **settings)
    assert resumed.backend.precision.scaler.get_scale() == scale  # type: ignore[attr-defined]
    resumed.fit(x, y, until_epoch=3)
    assert_same_state(straight, resumed, ledger=False)
    skipped = [r["skipped_steps"] for r in straight.history]
    assert skipped[0] >= 1 and all(s == int(s) for s in skipped)  # not a NaN-loss error


def test_evaluation_uses_the_ema_weights_and_the_modes_table_applies_to_them():
    x, y = make_data(96)
    t = make_trainer(ema=0.5)
    t.fit(x, y, epochs=1)
    ema = t.backend.ema  # type: ignore[attr-defined]
    assert ema.updates == 6
    raw = make_trainer(ema=0.5, use_ema=False)
    raw.load_state_dict(t.state_dict())
    assert t.evaluate(x, y)["loss"] != raw.evaluate(x, y)["loss"]
    trained = {k: v.clone() for k, v in t.model.state_dict().items()}
    with ema.swapped_in(t.model):
        via_ema = t.model(torch.from_numpy(x[:4]).float())
    t.model.eval()
    assert torch.equal(t.predict(x[:4]), via_ema.detach())
    assert all(torch.equal(trained[k], v) for k, v in t.model.state_dict().items())  # put back
    t.fit(x, y, epochs=1, mode="warm")
    assert ema.updates == 12  # warm keeps the average
    t.fit(x, y, epochs=1, mode="restart")
    assert ema.updates == 6  # a new run's average starts again


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"precision": "fp8"}, "The 'precision' parameter of Trainer must be one of {'32', 'bf16', 'fp16'}. Got 'fp8' instead."),
        ({"accumulate": 0}, "The 'accumulate' parameter of Trainer must be an int >= 1. Got 0 instead."),
        ({"ema": 1.5}, "The 'ema' parameter of Trainer must be a decay in (0, 1) or None. Got 1.5 instead."),
        ({"clip_grad_norm": 0.0}, "The 'clip_grad_norm' parameter of Trainer must be a finite number > 0 or None. Got 0.0 instead."),
        ({"ema_warmup": True}, "ema_warmup=True needs an EMA: pass ema=<decay> too."),
        ({"use_ema": True}, "use_ema=True needs an EMA of the weights: pass ema=<decay> too."),
    ],
)
def test_bad_options_are_refused_with_a_message(kwargs, message):
    with pytest.raises(ValueError) as err:
        make_trainer(**kwargs)
    assert str(err.value) == message


def test_fp16_scaling_of_float16_weights_is_refused_before_anything_changes():
    """torch's GradScaler refuses float16 gradients in the middle of the first step
    (after the call was counted); warmfit refuses the call first."""
    x, y = make_data(64)
    t = make_trainer(model=lambda: MLP().half(), precision="fp16", metrics=[])
    before = t.state_dict()
    with pytest.raises(ValueError) as err:
        t.fit(torch.from_numpy(x).half(), y, epochs=1)
    assert str(err.value) == (
        "precision='fp16' scales the gradients of weights kept in float32 (mixed precision), "
        "but this model's weights are float16 (net.0.weight, ...), whose gradients torch's "
        "scaler cannot unscale. Keep the weights in float32 (autocast computes in float16), "
        "or train the float16 model with precision='32'."
    )
    assert_same_state(before, t)
    assert len(t.ledger) == 0 and t.global_step == 0


def test_bf16_weights_with_every_option_resume_exactly():
    """A model converted to bfloat16 (data too), bf16 autocast, accumulation, clipping,
    EMA: a cut resumed in a fresh Trainer == straight."""
    x, y = make_data(64)
    xb = torch.from_numpy(x).bfloat16()

    def build() -> warmfit.Trainer:
        return make_trainer(model=lambda: MLP().bfloat16(), metrics=[], precision="bf16",
                            accumulate=2, clip_grad_norm=1.0, ema=0.9)  # fmt: skip

    straight = build()
    straight.fit(xb, y, epochs=2)
    first = build()
    first.fit(xb, y, steps=5)
    resumed = build()
    resumed.load_state_dict(first.state_dict())
    resumed.fit(xb, y, until_epoch=2)
    assert_same_state(straight, resumed, ledger=False)


def test_float32_data_into_bf16_weights_runs_under_the_precision_everywhere():
    """The probe, evaluation and prediction run under the precision's autocast, as the
    step's forward does: float32 data into a bfloat16 model trains (the probe does not
    refuse it), resumes exactly, and evaluates as a hand-written autocast loop does."""
    x, y = make_data(64)

    def build() -> warmfit.Trainer:
        return make_trainer(model=lambda: MLP().bfloat16(), metrics=[], precision="bf16")

    straight = build()
    straight.fit(x, y, epochs=2, validation_data=(x[:16], y[:16]))
    split = build()
    split.fit(x, y, epochs=1, validation_data=(x[:16], y[:16]))
    split.fit(x, y, epochs=1, validation_data=(x[:16], y[:16]))
    assert_same_state(straight, split, ledger=False)
    model = straight.model
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.from_numpy(x))
        by_hand = F.cross_entropy(out, torch.from_numpy(y)).double().item()
    assert straight.evaluate(x, y, batch_size=len(x))["loss"] == by_hand
    pred = straight.predict(x, batch_size=len(x))
    assert pred.dtype == torch.bfloat16 and torch.equal(pred, out)
    assert straight.history[-1]["val_loss"] == straight.evaluate(x[:16], y[:16])["loss"]


def test_the_options_are_refused_for_a_scikit_learn_model():
    from sklearn.linear_model import SGDClassifier

    with pytest.raises(ValueError) as err:
        warmfit.Trainer(SGDClassifier(), precision="bf16", verbose=0)
    assert str(err.value) == (
        "precision= is an option of the PyTorch training step; warmfit does not offer it "
        "for scikit-learn models yet. Remove it."
    )


@pytest.mark.parametrize(
    ("before", "after"), [({"accumulate": 2}, {}), ({}, {"accumulate": 2}), ({"ema": 0.9}, {})]
)
def test_a_continue_with_other_step_options_is_refused(tmp_path, before, after):
    x, y = make_data(64)
    t = make_trainer(run_dir=tmp_path / "run", **before)
    t.fit(x, y, epochs=1)
    t.close()
    with pytest.warns(UserWarning, match="step_options"):
        other = make_trainer(run_dir=tmp_path / "run", **after)
    with pytest.raises(warmfit.StateMismatchError, match="step_options"):
        other.fit(x, y, epochs=1)
    assert other.epoch == 1
    other.fit(x, y, epochs=1, mode="warm")  # on purpose: allowed, and recorded
    assert other.ledger[-1]["changes"]["settings"][0].startswith("step_options")


def test_accumulation_is_exactly_a_hand_written_accumulation_loop_under_adamw():
    """The hand loop nanoGPT-style code writes — the global batch in 4 contiguous
    micro-batches, each mean loss times its share, backward, then AdamW — from the same
    initial weights and warmfit's epoch orders: the very same bits. Against accumulate=1
    the sums differ in order only; AdamW can amplify that in its first steps (measured
    6.0e-8 max after 26 steps here, bound 1e-5)."""
    x, y = make_data(200)
    settings = {**trainer_settings(), "schedule": None, "metrics": [],
                "optimizer": lambda p: torch.optim.AdamW(p, lr=1e-2)}  # fmt: skip
    t = warmfit.Trainer(lambda: MLP(p=0.0), **settings, accumulate=4)
    hand = MLP(p=0.0)
    hand.load_state_dict(t.model.state_dict())
    one = warmfit.Trainer(lambda: MLP(p=0.0), **settings)
    t.fit(x, y, epochs=2)
    one.fit(x, y, epochs=2)
    opt = torch.optim.AdamW(hand.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for epoch in range(2):
        order = torch.from_numpy(warmfit.data.epoch_permutation(7, epoch, 200))
        for rows in order.split(16):
            opt.zero_grad(set_to_none=True)
            for part in torch.tensor_split(rows, 4):
                loss = F.cross_entropy(hand(xt[part]), yt[part])
                (loss * (len(part) / len(rows))).backward()
            opt.step()
    for k, v in hand.state_dict().items():
        assert torch.equal(v, t.model.state_dict()[k]), k
    diffs = [(a - b).abs().max().item() for a, b in zip(
        one.model.state_dict().values(), t.model.state_dict().values(), strict=True)]  # fmt: skip
    assert 0 < max(diffs) < 1e-5
