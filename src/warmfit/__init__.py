"""warmfit: one explicit, exact and resumable meaning of "call fit() again".

``Trainer.fit(..., mode="continue" | "warm" | "restart")`` with ``epochs=`` always
meaning *additional* epochs; bit-exact continuation across calls, processes and
crashes; the whole training state in one safe checkpoint. See ``docs/design.md``.
"""

__version__ = "0.1.0"

from . import boosting as boosting  # warmfit.boosting.XGBoost / LightGBM
from .callbacks import Callback, EarlyStopping, ReduceLROnPlateau, StepLogs
from .errors import (
    CheckpointError,
    NonFiniteLossError,
    RunDirLockedError,
    StateMismatchError,
    TrainingInterrupted,
    WarmfitError,
)
from .fork import ForkError
from .history import History, Ledger
from .monitor import OverfittingMonitor, OverfittingWarning
from .trainer import MODES, Trainer

__all__ = [
    "MODES",
    "Callback",
    "CheckpointError",
    "EarlyStopping",
    "ForkError",
    "History",
    "Ledger",
    "NonFiniteLossError",
    "OverfittingMonitor",
    "OverfittingWarning",
    "ReduceLROnPlateau",
    "RunDirLockedError",
    "StateMismatchError",
    "StepLogs",
    "Trainer",
    "TrainingInterrupted",
    "WarmfitError",
    "__version__",
]
