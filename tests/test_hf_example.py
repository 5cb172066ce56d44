"""examples/hf_classify.py with a real (tiny, randomly initialised) Hugging Face BERT:
dict batches, the model's own ``.loss``, AdamW groups by name, warm-up + cosine,
clipping, dropout on — split calls and a cut inside an epoch, saved and loaded into a
fresh Trainer, end in the very same bits as one uninterrupted call, in fp32 and in bf16
with gradient accumulation. Nothing reaches the network (``HF_HUB_OFFLINE``; the model
is built from a config)."""

from __future__ import annotations

import functools
import importlib.util
import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import assert_same_state, require
from warmfit import Trainer
from warmfit.check import compare_states
from warmfit.testing import Case, check_backend

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers (and huggingface_hub) is imported
transformers = require("transformers", "the transformers extra is not installed")

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "hf_classify.py"
_spec = importlib.util.spec_from_file_location("hf_classify", EXAMPLE)
assert _spec is not None and _spec.loader is not None
hf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hf)

DATA = hf.data(256, seed=0)  # 192 training rows after the split: 6 steps of 32 an epoch
FIT = dict(validation_split=0.25)
OPTIONS = {"fp32": dict(), "bf16+accumulate=2": dict(precision="bf16", accumulate=2)}


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any connection attempt fails the test: the model comes from a config alone."""

    def refuse(self, address):
        raise AssertionError(f"the Hugging Face example tried to connect to {address!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


@functools.cache
def straight(option: str) -> dict[str, Any]:
    """The uninterrupted run: 2 epochs in one fit call (its state_dict)."""
    t = hf.trainer(**OPTIONS[option])
    t.fit(DATA, epochs=2, **FIT)
    return t.state_dict()


def test_the_model_is_a_real_transformers_model_with_dropout_on():
    t = hf.trainer()
    assert isinstance(t.model, transformers.BertForSequenceClassification)
    assert t.model.config.hidden_dropout_prob == 0.1
    assert t.model.config.attention_probs_dropout_prob == 0.1
    # In train mode two forward passes differ: the random streams decide the result.
    ids = torch.as_tensor(DATA["input_ids"][:8])
    mask = torch.as_tensor(DATA["attention_mask"][:8])
    t.model.train()
    assert not torch.equal(t.model(ids, mask).logits, t.model(ids, mask).logits)


@pytest.mark.parametrize("option", OPTIONS)
def test_two_fit_calls_equal_one(option):
    split = hf.trainer(**OPTIONS[option])
    split.fit(DATA, epochs=1, **FIT)
    torch.rand(5)  # the caller's streams, disturbed between the calls
    split.fit(DATA, epochs=1, **FIT)
    assert_same_state(straight(option), split)
    assert [r["epoch"] for r in split.history] == [1, 2]
    assert split.history[-1]["val_loss"] == straight(option)["state"]["history"][-1]["val_loss"]


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("steps", [4, 9])  # inside epoch 1, inside epoch 2
def test_a_cut_inside_an_epoch_saved_and_loaded_continues_exactly(tmp_path, option, steps):
    cut = hf.trainer(**OPTIONS[option])
    cut.fit(DATA, steps=steps, **FIT)
    assert cut.global_step == steps and cut.cursor.offset > 0
    path = cut.save(tmp_path / "cut")
    del cut
    resumed = Trainer.load(path, hf.model, **hf.settings(**OPTIONS[option]))
    resumed.fit(DATA, until_epoch=2, **FIT)
    assert_same_state(straight(option), resumed)


def test_bf16_autocast_and_accumulation_take_effect():
    fp32, bf16 = straight("fp32"), straight("bf16+accumulate=2")
    assert compare_states(fp32, bf16) != []  # bf16 trains otherwise: autocast is on
    assert bf16["state"]["history"][-1]["loss"] != fp32["state"]["history"][-1]["loss"]


@pytest.mark.parametrize("option", OPTIONS)
def test_the_conformance_suite_passes_on_the_hf_model(tmp_path, option):
    # split, save/load, steps, SIGTERM, rewind, restart, warm, seed: each == the reference
    case = Case(
        f"hf-bert-{option}",
        build=lambda: (hf.model, hf.settings(**OPTIONS[option])),
        data=lambda: (DATA,),
        fit_kwargs=lambda: dict(FIT),
        total=3,
        steps_per_epoch=6,
    )
    check_backend(case, tmp_path)


def test_main_trains_in_split_calls_and_prints_the_accuracy(capsys):
    hf.main(epochs=2)
    out = capsys.readouterr().out
    assert "epoch 2: loss" in out and "test accuracy" in out
    assert "2 fit calls == one call of 2 epochs, bit for bit: True" in out


def test_a_resume_that_builds_another_attention_implementation_is_refused(tmp_path):
    """sdpa and eager attention are each exact, but compute other bits: a resume into
    the other one is named, and a 'continue' refuses it (mode='warm' accepts it)."""
    first = hf.trainer(run_dir=tmp_path / "run")
    first.fit(DATA, epochs=1, **FIT)
    first.close()

    def eager() -> torch.nn.Module:
        return transformers.BertForSequenceClassification(hf.config(attn_implementation="eager"))

    with pytest.warns(UserWarning, match="attn_implementation: checkpoint 'sdpa', now 'eager'"):
        other = Trainer(eager, **hf.settings(run_dir=tmp_path / "run"))
    with pytest.raises(Exception, match="attn_implementation") as err:
        other.fit(DATA, epochs=1, **FIT)
    assert type(err.value).__name__ == "StateMismatchError" and other.epoch == 1
