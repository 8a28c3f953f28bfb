"""Errors a user can act on. Every message says what went wrong and what to do about it."""


class QvizError(Exception):
    """Base class of every error qviz raises on purpose."""


class InputDataError(QvizError):
    """Calibration or evaluation data that cannot be used (empty, wrong shape, wrong type)."""


class ModelError(QvizError):
    """A model the chosen flow cannot handle (not traceable, no stubs, ...)."""


class ConfigError(QvizError):
    """A configuration (flow, backend, qconfig, plan) that is unknown or inconsistent."""


class SessionFileError(QvizError):
    """A session file that is truncated, corrupted, of another format or of an unknown version."""


class SweepError(QvizError):
    """A sensitivity sweep in which ``eval_fn`` failed on some layers (the first failure is the
    ``__cause__``): ``.layers`` names them, ``.partial`` is the Sensitivity of all the others."""

    def __init__(self, message: str, partial=None, layers=()):
        super().__init__(message)
        self.partial, self.layers = partial, list(layers)
