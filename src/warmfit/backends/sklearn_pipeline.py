"""scikit-learn ``Pipeline``: the transformers are fitted once per run, the final step trains.

A Pipeline under the scikit-learn backend (``sklearn.py``) is its **final step**, trained
as the bare estimator would be (by ``partial_fit`` batches, or by rounds), on rows that
went through the **transformers** (every step but the last). The transformers are fitted
on the training rows at the start of a run (the first fit call, and every
``mode="restart"``), kept by ``continue`` and ``warm`` (also on other data), and fitted
again on a call whose training data differ from those they were fitted on only if the
Trainer was built with ``backend_options={"refit_transformers": "new_data"}``
(``docs/sklearn.md``, "Pipelines").

Owns: the construction checks of a Pipeline, fitting its transformers (clones, fitted one
after the other with ``fit`` and then ``transform``, under a NumPy stream derived from the
seed, so a transformer with ``random_state=None`` is fitted the same way in every run and
the caller's global stream is untouched), turning rows into what the final step sees,
putting fitted or loaded steps into the step objects the user holds (:func:`adopt`), and
the parameters a resume compares. Does not own: the final step's modes, its stopping
rules, its state and the checkpoint format, which ``sklearn.py`` handles as for a bare
estimator (the whole Pipeline is one skops entry).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..state import derive_seed

#: The values of the backend option ``refit_transformers``.
REFIT_CHOICES = ("restart", "new_data")

_INSTEAD_KEEP = (
    "Pass data they can transform (a OneHotEncoder(handle_unknown='ignore') for categories "
    "it has not seen), fit with mode='restart' to fit them again on this data, or build the "
    "Trainer with backend_options={'refit_transformers': 'new_data'}."
)


def is_pipeline(model: Any) -> bool:
    from sklearn.pipeline import Pipeline

    return isinstance(model, Pipeline)


def is_dataframe(x: Any) -> bool:
    """Whether ``x`` is a pandas DataFrame or Series (pandas is never imported for it)."""
    pd = sys.modules.get("pandas")
    return pd is not None and isinstance(x, (pd.DataFrame, pd.Series))


def dataframe_refusal(what: str) -> TypeError:
    return TypeError(
        f"{what} is a pandas DataFrame: warmfit trains a Pipeline on NumPy arrays (it hashes, "
        "orders and cuts the rows as arrays, and the transformers are fitted on them). Pass "
        "x.to_numpy() (string categories encoded as integer codes first) and name the "
        "ColumnTransformer's columns by position (e.g. [0, 1, 2]), not by name."
    )


def final_step(pipe: Any) -> tuple[str, Any]:
    """The name and estimator of the Pipeline's last step."""
    name, est = pipe.steps[-1]
    return name, est


def head(pipe: Any) -> list[tuple[str, Any]]:
    """The transformers: every step but the last, ``'passthrough'``/None left out."""
    return [(n, s) for n, s in pipe.steps[:-1] if s is not None and s != "passthrough"]


def check_pipeline(pipe: Any) -> None:
    """Refuse a Pipeline whose shape warmfit cannot train (before anything is built)."""
    if not pipe.steps:
        raise ValueError("The Pipeline has no steps. Pass Pipeline([(name, estimator), ...]).")
    name, last = final_step(pipe)
    if last is None or (isinstance(last, str) and last == "passthrough"):
        raise TypeError(
            f"The final step {name!r} of the Pipeline is {last!r}: warmfit trains a "
            "Pipeline's final step, so it must be an estimator with partial_fit "
            "(SGDClassifier, MLPClassifier, ...) or one that grows with warm_start "
            "(RandomForest, HistGradientBoosting, ...). Put one last."
        )
    for n, step in head(pipe):
        if not (hasattr(step, "fit") and hasattr(step, "transform")):
            raise TypeError(
                f"The step {n!r} of the Pipeline ({type(step).__name__}) has no fit and "
                "transform: every step but the last must be a transformer, or "
                "'passthrough'. Move it last, or remove it."
            )


def n_features_in(pipe: Any) -> int | None:
    """The number of input features the fitted transformers expect (None if unknown)."""
    steps = head(pipe)
    return getattr(steps[0][1], "n_features_in_", None) if steps else None


@contextlib.contextmanager
def seeded_global_stream(seed: int) -> Iterator[None]:
    """NumPy's global generator set from ``seed`` for the block (what a transformer with
    ``random_state=None`` draws from), and the caller's state put back after it."""
    saved = np.random.get_state()
    np.random.seed(derive_seed(seed, "init", 2) % (1 << 32))
    try:
        yield
    finally:
        np.random.set_state(saved)


def fit_transformers(steps: list[tuple[str, Any]], x: Any, y: Any) -> tuple[list[Any], Any]:
    """Clones of ``steps`` fitted one after the other (each on the previous one's output,
    with ``fit`` then ``transform``, so the rows the final step trains on are exactly what
    ``transform`` gives in every later call), and the rows they turn ``x`` into."""
    from sklearn.base import clone

    fitted = []
    for name, step in steps:
        est = clone(step)
        try:
            est.fit(x, y)
            x = est.transform(x)
        except Exception as err:
            raise ValueError(
                f"Fitting the Pipeline's transformers on the training data failed at step "
                f"{name!r} ({type(est).__name__}): {type(err).__name__}: {err}. Fix the data "
                "or the step's parameters (nothing has changed)."
            ) from err
        fitted.append(est)
    return fitted, x


def transform(steps: list[tuple[str, Any]], x: Any, what: str) -> Any:
    """``x`` through fitted transformers; ``what`` names the data in a refusal."""
    for name, step in steps:
        try:
            x = step.transform(x)
        except Exception as err:
            raise ValueError(
                f"The Pipeline's transformers (fitted at the start of the run) cannot "
                f"transform {what}: step {name!r} ({type(step).__name__}) raised "
                f"{type(err).__name__}: {err}. {_INSTEAD_KEEP}"
            ) from err
    return x


def install(pipe: Any, fitted: list[Any]) -> None:
    """Make the transformers of ``pipe`` the ``fitted`` ones, in place (same objects)."""
    for (_, mine), theirs in zip(head(pipe), fitted, strict=True):
        become(mine, theirs)


def adopt(target: Any, source: Any) -> None:
    """Make ``target`` an exact copy of ``source`` in place: the estimator object stays the
    one the user holds, as with the PyTorch backend; for a Pipeline, each step object too
    (a reference to ``pipe[-1]`` taken before a restart or a load stays valid)."""
    if not (is_pipeline(target) and is_pipeline(source)):
        become(target, source)
        return
    steps = []
    for (name, mine), (_, theirs) in zip(target.steps, source.steps, strict=True):
        same = type(mine) is type(theirs) and hasattr(mine, "__dict__") and mine is not theirs
        if same and not isinstance(mine, str):
            adopt(mine, theirs)
            steps.append((name, mine))
        else:
            steps.append((name, theirs))
    become(target, source)
    target.steps = steps


def become(target: Any, source: Any) -> None:
    """``target``'s attributes replaced by ``source``'s (which is discarded after)."""
    target.__dict__.clear()
    target.__dict__.update(source.__dict__)


def signature(pipe: Any) -> list[list[str]]:
    """``[[name, class], ...]`` of every step: what a checkpoint's Pipeline must match."""
    return [[n, _qualname(s) if not isinstance(s, str) and s is not None else repr(s)]
            for n, s in pipe.steps]  # fmt: skip


def describe_params(pipe: Any, managed: set[str]) -> dict[str, Any]:
    """The Pipeline's parameters, deep, as JSON (estimators by class), without ``managed``
    (the final step's parameters warmfit writes while training)."""
    return {k: _described(v) for k, v in pipe.get_params(deep=True).items() if k not in managed}


def _described(v: Any) -> Any:
    from sklearn.base import BaseEstimator

    if isinstance(v, BaseEstimator):
        return _qualname(v)
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (list, tuple)):
        return [_described(i) for i in v]
    if isinstance(v, dict):
        return {str(k): _described(i) for k, i in v.items()}
    if isinstance(v, np.ndarray) and v.dtype != object and v.size <= 1000:
        return _described(v.tolist())
    if isinstance(v, np.random.RandomState):
        return "RandomState"
    if isinstance(v, type) or (callable(v) and hasattr(v, "__qualname__")):
        return f"{getattr(v, '__module__', None)}.{v.__qualname__}"  # no address
    return repr(v)


def _qualname(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"
