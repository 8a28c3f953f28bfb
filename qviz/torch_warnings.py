"""Keep torch's repeated quantization warnings away from users, and say it once instead.

torch 2.13 warns on every ``prepare``/``convert`` that ``torch.ao.quantization`` is deprecated,
and on creating quantized tensors (pytorch/pytorch#184982). qviz drives those APIs hundreds of
times per session; the user learns of the deprecation once, from qviz.
"""

from __future__ import annotations

import contextlib
import warnings

_said = False
_NOTE = (
    "torch.ao.quantization (eager, FX, dynamic) is deprecated in favour of torchao; qviz hides "
    "torch's repeated deprecation warnings for these flows"
)


@contextlib.contextmanager
def quiet_torch(say_deprecation: bool = False):
    """Silence torch's deprecation/quantized-tensor warnings inside the block; with
    ``say_deprecation`` (a torch.ao flow ran), say once that torch.ao is deprecated."""
    global _said
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=r".*(quantiz|observer|qconfig|TypedStorage).*")
        yield
    if say_deprecation and not _said:
        _said = True
        warnings.warn(_NOTE, FutureWarning, stacklevel=4)
