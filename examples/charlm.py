"""A tiny character-level transformer language model (nanoGPT-style), trained on this
project's own documentation: ``warmfit train examples/charlm.toml``.

Everything a real language-model run has, at a size that trains on a laptop CPU in a
minute: dict batches (``{"idx": ..., "targets": ...}``) and a model that computes its
own loss (``forward(idx, targets)`` returns an output with ``.loss``, the Hugging Face
convention, so the spec needs no ``loss``), AdamW with decay/no-decay parameter groups
chosen by name, warm-up + cosine, bf16 autocast, gradient accumulation, gradient
clipping and an EMA of the weights (``charlm.toml``). At the end of every ``warmfit
train`` call, :class:`SampleText` prints a line of text the model writes (with the EMA
weights), so one sees it learn across calls.

The names the spec uses: :func:`model`, :func:`data`, :func:`adamw`, :func:`schedule`,
:class:`SampleText`.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import warmfit

ROOT = Path(__file__).resolve().parent.parent
BLOCK = 64  # characters of context
EMBED, HEADS, LAYERS = 64, 4, 2


def text() -> str:
    """The corpus: this project's documentation (a few hundred KB at most)."""
    parts = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return "\n\n".join(p.read_text(encoding="utf-8") for p in parts)


def vocabulary() -> list[str]:
    return sorted(set(text()))


@dataclass
class LMOutput:
    """What the model returns: the logits and, given targets, the mean loss."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(EMBED), nn.LayerNorm(EMBED)
        self.qkv = nn.Linear(EMBED, 3 * EMBED)
        self.proj = nn.Linear(EMBED, EMBED)
        self.mlp = nn.Sequential(
            nn.Linear(EMBED, 4 * EMBED), nn.GELU(), nn.Linear(4 * EMBED, EMBED)
        )
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(EMBED, dim=2)
        q, k, v = (z.view(b, t, HEADS, c // HEADS).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.drop(self.proj(y.transpose(1, 2).reshape(b, t, c)))
        return x + self.drop(self.mlp(self.ln2(x)))


class CharLM(nn.Module):
    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, EMBED)
        self.pos = nn.Embedding(BLOCK, EMBED)
        self.blocks = nn.Sequential(*(Block() for _ in range(LAYERS)))
        self.ln = nn.LayerNorm(EMBED)
        self.head = nn.Linear(EMBED, vocab, bias=False)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> LMOutput:
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        logits = self.head(self.ln(self.blocks(x)))
        if targets is None:
            return LMOutput(logits)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        return LMOutput(logits, loss)


def model() -> nn.Module:
    return CharLM(len(vocabulary()))


def data(windows: int = 1024, seed: int = 0) -> dict:
    """``windows`` training windows of ``BLOCK + 1`` characters at seeded random places
    of the first 90% of the text, and a quarter as many validation windows from the
    rest: dict batches the model takes as ``model(**batch)``."""
    chars = vocabulary()
    codes = np.array([chars.index(c) for c in text()], dtype=np.int64)
    cut = int(len(codes) * 0.9)
    rng = np.random.default_rng(seed)

    def cut_windows(part: np.ndarray, n: int) -> dict[str, np.ndarray]:
        starts = rng.integers(0, len(part) - BLOCK - 1, size=n)
        w = np.stack([part[s : s + BLOCK + 1] for s in starts])
        return {"idx": w[:, :-1].copy(), "targets": w[:, 1:].copy()}

    return {"x": cut_windows(codes[:cut], windows), "x_val": cut_windows(codes[cut:], windows // 4)}


def adamw(model: nn.Module) -> torch.optim.Optimizer:
    """AdamW with weight decay on the weight matrices only — none on biases, LayerNorm
    weights and the position embedding (nanoGPT's recipe), chosen by parameter name: the
    factory's parameter is named ``model``, so warmfit passes the module."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and not name.startswith("pos") else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=3e-3, betas=(0.9, 0.95))


def schedule() -> warmfit.schedules.Schedule:
    """Linear warm-up over 20 optimizer steps, then cosine to a tenth over 400."""
    return warmfit.schedules.warmup(
        20, warmfit.schedules.cosine(3e-3, horizon=400, min_lr=3e-4)
    )


@torch.no_grad()
def sample(net: nn.Module, prompt: str = "The ", length: int = 120, seed: int = 0) -> str:
    """``length`` characters after ``prompt``, drawn from the model's distribution with
    a generator of its own (the training streams are not touched)."""
    chars = vocabulary()
    gen = torch.Generator().manual_seed(seed)
    device = next(net.parameters()).device
    idx = torch.tensor([[chars.index(c) for c in prompt]], device=device)
    was_training = net.training
    net.eval()
    for _ in range(length):
        logits = net(idx[:, -BLOCK:]).logits[0, -1].float()
        probs = torch.softmax(logits, dim=-1).cpu()
        nxt = torch.multinomial(probs, 1, generator=gen).to(device)
        idx = torch.cat([idx, nxt.view(1, 1)], dim=1)
    net.train(was_training)
    return "".join(chars[i] for i in idx[0].tolist())


def perplexity(loss: float) -> float:
    return math.exp(loss)


class SampleText(warmfit.Callback):
    """At the end of every fit call, print what the model writes after "The " (with
    the EMA weights where there are any). Holds no state: changes nothing the run
    computes."""

    def __init__(self, length: int = 100) -> None:
        self.length = length

    def on_fit_end(self, trainer: warmfit.Trainer) -> None:
        if trainer.rank != 0 or not trainer.fit_verbose:
            return
        ema = getattr(trainer.backend, "ema", None)
        weights = ema.swapped_in(trainer.model) if ema is not None else contextlib.nullcontext()
        with weights:
            text = sample(trainer.model, length=self.length)
        print(f"sample after epoch {trainer.epoch}: {text!r}", flush=True)
