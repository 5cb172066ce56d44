"""Fine-tune a tiny Hugging Face BERT with warmfit: dict batches, the model's own loss,
AdamW groups by parameter name, warm-up + cosine, gradient clipping and a validation
split, trained in several fit calls that give the very same bits as one.

Nothing is downloaded: the model is built from a ``BertConfig`` with random weights (a
pretrained checkpoint would be loaded the same way, in the factory), and the task is
synthetic: does the sequence contain the keyword token? Run it::

    pip install "warmfit[transformers]"
    python examples/hf_classify.py

``tests/test_hf_example.py`` checks split calls, a cut inside an epoch with a save and a
load into a fresh Trainer, and bf16 with gradient accumulation, bit for bit.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import transformers
from torch import nn

import warmfit
from warmfit import schedules
from warmfit.check import compare_states

VOCAB, LENGTH = 64, 16
PAD, CLS, SEP, KEYWORD = 0, 1, 2, 3  # the ids below 4 are special; words are 4..63
LR = 3e-3
NO_DECAY = ("bias", "LayerNorm.weight")  # the Hugging Face recipe: no decay on these


def config(**overrides: Any) -> transformers.BertConfig:
    """A two-layer BERT of hidden size 32; dropout 0.1 (the defaults) is on."""
    settings: dict[str, Any] = dict(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=32, num_labels=2,
        pad_token_id=PAD,
    )  # fmt: skip
    settings.update(overrides)
    return transformers.BertConfig(**settings)


def model() -> nn.Module:
    """The factory warmfit calls with its seed installed (and again for ``restart``)."""
    return transformers.BertForSequenceClassification(config())


def adamw(model: nn.Module) -> torch.optim.Optimizer:
    """The first parameter is named ``model``: warmfit passes the module, so the groups
    can go by the parameters' names."""
    decay, rest = [], []
    for name, p in model.named_parameters():
        (rest if name.endswith(NO_DECAY) else decay).append(p)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}], lr=LR
    )


def schedule(total_steps: int, warmup_steps: int) -> schedules.Schedule:
    """Linear warm-up, then a cosine decay to a tenth of the peak over the run."""
    return schedules.warmup(
        warmup_steps, schedules.cosine(LR, horizon=total_steps - warmup_steps, min_lr=LR / 10)
    )


def data(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``{"input_ids", "attention_mask", "labels"}``: ``[CLS] words [SEP] pad...`` of 6 to
    16 tokens; the label says whether the keyword is among the words (half of them)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(6, LENGTH + 1, size=n)
    ids = rng.integers(KEYWORD + 1, VOCAB, size=(n, LENGTH))
    labels = rng.integers(0, 2, size=n)
    where = rng.integers(1, lengths - 1)  # a word position, between [CLS] and [SEP]
    rows = np.arange(n)
    ids[rows[labels == 1], where[labels == 1]] = KEYWORD
    ids[:, 0] = CLS
    ids[rows, lengths - 1] = SEP
    mask = np.arange(LENGTH) < lengths[:, None]
    ids[~mask] = PAD
    return {
        "input_ids": ids.astype(np.int64),
        "attention_mask": mask.astype(np.int64),
        "labels": labels.astype(np.int64),
    }


def settings(**overrides: Any) -> dict[str, Any]:
    """The Trainer's arguments (all but the model); ``overrides`` replace them."""
    out: dict[str, Any] = dict(
        optimizer=adamw,
        loss=None,  # the model's output .loss: the labels travel in the dict batch
        schedule=schedule(total_steps=96, warmup_steps=8),
        clip_grad_norm=1.0,
        batch_size=32,
        seed=0,
        verbose=0,
    )
    out.update(overrides)
    return out


def trainer(**overrides: Any) -> warmfit.Trainer:
    return warmfit.Trainer(model, **settings(**overrides))


def accuracy(t: warmfit.Trainer, batch: dict[str, np.ndarray]) -> float:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = t.predict(inputs).logits
    return float((logits.argmax(-1).numpy() == batch["labels"]).mean())


def main(epochs: int = 8) -> None:
    train, test = data(512, seed=0), data(256, seed=1)
    # 384 training rows after validation_split=0.25: 12 steps an epoch, 96 in 8 epochs.
    split = trainer()
    for _ in range(epochs):  # one fit call per epoch, as a notebook would
        split.fit(train, epochs=1, validation_split=0.25)
        row = split.history[-1]
        print(
            f"epoch {row['epoch']}: loss {row['loss']:.4f}, val_loss {row['val_loss']:.4f}, "
            f"grad_norm {row['grad_norm']:.3f}, test accuracy {accuracy(split, test):.3f}"
        )
    straight = trainer()
    straight.fit(train, epochs=epochs, validation_split=0.25)  # the same run in one call
    same = compare_states(split.state_dict(), straight.state_dict()) == []
    print(f"{epochs} fit calls == one call of {epochs} epochs, bit for bit: {same}")


if __name__ == "__main__":
    main()
