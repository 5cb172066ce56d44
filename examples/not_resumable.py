"""A model that is deliberately NOT resumable, for ``warmfit check-resume``.

Its forward pass scales the output by a factor drawn from ``_noise``, a module-level
``random.Random()`` instance: unseeded, and not one of the random streams warmfit owns
(Python's global ``random``, NumPy's, torch's). Two runs draw different numbers, so
``warmfit check-resume examples/not_resumable.toml --steps 10`` reports the first step
where the weights diverge. The fix is to draw from the global ``random`` / ``torch``
generators (which warmfit saves and restores), or to seed and checkpoint your own.
"""

from __future__ import annotations

import random

import torch
from torch import nn

from warmfit.demo import load_digits_split

_noise = random.Random()  # unseeded, owned by nobody: the bug this example shows


class NoisyMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = 1.0 + 0.1 * _noise.random() if self.training else 1.0
        return self.net(x) * scale


def model() -> nn.Module:
    return NoisyMLP()


def data():
    x, y, x_val, y_val = load_digits_split(seed=0)
    return x, y, x_val, y_val


def sgd(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)
