"""warmfit: one explicit, exact and resumable meaning of "call fit() again".

``Trainer.fit(..., mode="continue" | "warm" | "restart")`` with ``epochs=`` always
meaning *additional* epochs; bit-exact continuation across calls, processes and
crashes; the whole training state in one safe checkpoint. See ``docs/design.md``.
"""

__version__ = "0.1.0"

from .callbacks import Callback, EarlyStopping, ReduceLROnPlateau  # noqa: E402
from .errors import (  # noqa: E402
    CheckpointError,
    NonFiniteLossError,
    RunDirLockedError,
    StateMismatchError,
    TrainingInterrupted,
    WarmfitError,
)
from .history import History, Ledger  # noqa: E402
from .trainer import MODES, Trainer  # noqa: E402

__all__ = [
    "MODES",
    "Callback",
    "CheckpointError",
    "EarlyStopping",
    "History",
    "Ledger",
    "NonFiniteLossError",
    "ReduceLROnPlateau",
    "RunDirLockedError",
    "StateMismatchError",
    "Trainer",
    "TrainingInterrupted",
    "WarmfitError",
    "__version__",
]
