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
