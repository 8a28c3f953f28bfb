"""qviz: an interactive visual debugger for PyTorch quantization."""

from __future__ import annotations

__version__ = "0.1.0"

from qviz.capture.qat import watch  # noqa: E402
from qviz.errors import (  # noqa: E402
    ConfigError,
    InputDataError,
    ModelError,
    QvizError,
    SessionFileError,
    SweepError,
)
from qviz.plan import LayerConfig, Plan  # noqa: E402
from qviz.session import Session, load  # noqa: E402

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
