"""Errors the CLI shows as one line naming the problem and the fix (no traceback)."""


class SimCLRError(Exception):
    """Base of every error caused by the user's input or environment, not by a bug."""


class ConfigError(SimCLRError):
    """An invalid option, preset or config value."""


class DataError(SimCLRError):
    """Data that is missing, empty or unreadable."""


class CheckpointError(SimCLRError):
    """A checkpoint that is missing, malformed or does not match what is asked of it."""


class NonFiniteLoss(SimCLRError):
    """A loss became NaN or inf; nothing from that step on is saved."""

    def __init__(self, step: int, *, what: str = "the loss"):
        super().__init__(
            f"{what} became NaN/inf at step {step}; stopped before saving anything from that step on. "
            "Lower --lr, try --precision fp32, or check the data"
        )
        self.step = step
