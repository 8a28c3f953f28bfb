"""qviz: an interactive visual debugger for PyTorch quantization."""

from __future__ import annotations

from qviz.capture.qat import watch
from qviz.errors import (
    ConfigError,
    InputDataError,
    ModelError,
    QvizError,
    SessionFileError,
    SweepError,
)
from qviz.plan import LayerConfig, Plan
from qviz.session import Session, load
from qviz.version import __version__

__all__ = [
    "ConfigError",
    "InputDataError",
    "LayerConfig",
    "ModelError",
    "Plan",
    "QvizError",
    "Session",
    "SessionFileError",
    "SweepError",
    "__version__",
    "load",
    "watch",
]
