"""Global torch modes that would change a fit call silently are refused before anything
changes (issue 15, item 3, and the modes found beside it).

The bug this guards: ``with torch.autocast("cpu", dtype=torch.bfloat16): trainer.fit(...)``
trained against autocast's cached bfloat16 copies of the weights (the cache lives for the
whole block): loss 4.43 where 3.27 was right, and no warning.
"""

from __future__ import annotations

import pytest
import torch

from conftest import make_data, make_trainer
from warmfit.check import compare_states

AUTOCAST = (
    "Trainer.fit was called inside torch.autocast (enabled for 'cpu', dtype torch.bfloat16). "
    "autocast keeps its casts of the weights for the whole block, so every step after the "
    "first would train against stale low-precision copies of the weights: a silently "
    "different result. Call fit outside autocast; for mixed precision, pass "
    "Trainer(precision='bf16') (or 'fp16'), which enters autocast around each step."
)


@pytest.mark.parametrize(
    ("block", "message"),
    [
        (lambda: torch.autocast("cpu", dtype=torch.bfloat16), AUTOCAST),
        (
            torch.no_grad,
            "Trainer.fit was called inside torch.no_grad() (or set_grad_enabled(False)): "
            "training needs gradients. Call fit outside that block (evaluate and predict run "
            "without gradients on their own).",
        ),
        (
            torch.inference_mode,
            "Trainer.fit was called inside torch.inference_mode(): training needs gradients. "
            "Call fit outside that block (evaluate and predict run without gradients on their "
            "own).",
        ),
    ],
    ids=["autocast", "no_grad", "inference_mode"],
)
def test_fit_inside_a_global_mode_is_refused_before_anything_changes(block, message):
    x, y = make_data(64)
    trainer = make_trainer()
    trainer.fit(x, y, epochs=1)
    before = trainer.state_dict()
    with block(), pytest.raises(RuntimeError) as err:
        trainer.fit(x, y, epochs=1)
    assert str(err.value) == message
    after = trainer.state_dict()
    assert compare_states(before, after) == []
    assert after["state"]["counters"] == before["state"]["counters"]
    assert len(trainer.ledger) == 1
    trainer.fit(x, y, epochs=1)  # outside the block it trains, as the message says
    assert trainer.epoch == 2


def test_autocast_inside_the_forward_trains_exactly_across_calls():
    """The way the message points to: autocast entered in forward, one step at a time."""

    class AutocastMLP(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(
                torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return self.net(x).float()

    x, y = make_data(96)
    straight = make_trainer(model=AutocastMLP)
    straight.fit(x, y, epochs=2)
    split = make_trainer(model=AutocastMLP)
    split.fit(x, y, epochs=1)
    split.fit(x, y, epochs=1)
    assert compare_states(straight.state_dict(), split.state_dict()) == []


def test_evaluate_and_predict_under_autocast_are_the_users_choice():
    x, y = make_data(64)
    trainer = make_trainer()
    trainer.fit(x, y, epochs=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert set(trainer.evaluate(x, y)) == {"loss", "accuracy"}
        assert trainer.predict(x).shape == (64, 3)
