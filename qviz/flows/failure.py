"""Why a model qviz built (prepared, reference or quantized) failed on a batch the float model runs.

Such a failure is not in the data: :func:`model_failure` names the innermost module that was
running when torch raised (by the float model's name and type, found from the traceback's frames,
no second run), the user's line where there is one, torch's first line, and the fix where the
error matches a known pattern (ops without a quantized kernel: :func:`qviz.flows.torch_ao.eager.unsupported_op_advice`).
"""

from __future__ import annotations

import linecache
import os
import re

import torch
from torch import nn

from qviz.errors import ModelError
from qviz.flows.torch_ao.eager import unsupported_op_advice

_TORCH_DIR = f"{os.sep}torch{os.sep}"

# (pattern of torch's message, what it means and what to do)
_KNOWN = (
    (re.compile(r"(\w+) not supported on quantized tensors"),
     "{0} is not implemented for quantized tensors (eager mode runs forward() as written: a "
     "chunk/split view or tensor arithmetic on a quantized tensor reaches it): use "
     "torch.ao.nn.quantized.FloatFunctional for the arithmetic, leave that block float (DeQuantStub "
     "before it, QuantStub after it), or use flow='fx', which handles such ops itself"),
    (re.compile(r"Could not run '(quantized::[\w.]+)' with arguments from the '(CPU|CUDA)' backend"),
     "{0} is a quantized op that was given a float tensor: in eager mode put a QuantStub before the "
     "quantized part and a DeQuantStub after it (or wrap the model in "
     "torch.ao.quantization.QuantWrapper), or use flow='fx'"),
    (re.compile(r"\"(?:histc|histogram)\w*\" not implemented for '(Long|Int|Short|Char|Byte|Bool)'"),
     "an observer was given an integer ({0}) tensor (e.g. `x * mask` with an integer mask): cast "
     "that tensor to float in the model, or leave the op float in the QConfigMapping "
     "(`.set_object_type(torch.mul, None)`, or `.set_module_name(name, None)`)"),
)


def _frames(exc: BaseException):
    tb = exc.__traceback__
    while tb is not None:
        yield tb.tb_frame, tb.tb_lineno
        tb = tb.tb_next


def _innermost(model: nn.Module, exc: BaseException) -> tuple[str, nn.Module, str]:
    """(name, module) of the innermost module of ``model`` running when ``exc`` was raised, and
    the last line outside torch in a module's code ('' when none): the user's line."""
    names = {id(m): n for n, m in model.named_modules()}
    name, module, line = "", model, ""
    for frame, lineno in _frames(exc):
        code = frame.f_code
        owner = frame.f_locals.get(code.co_varnames[0]) if code.co_argcount else None  # self
        if isinstance(owner, nn.Module) and id(owner) in names:
            name, module = names[id(owner)], owner
            if _TORCH_DIR not in code.co_filename:
                text = linecache.getline(code.co_filename, lineno).strip()
                line = f" at {code.co_filename}:{lineno} in {code.co_name}()" + (f": `{text}`" if text else "")
    return name, module, line


def _where(model: nn.Module, name: str, module: nn.Module, float_model: nn.Module) -> str:
    """'layer1.0' (Bottleneck); a module the flow inserted is named inside its float ancestor."""
    float_modules = dict(float_model.named_modules())
    if name in float_modules:
        kind = type(float_modules[name]).__name__
        return f"{name!r} ({kind})" if name else f"the forward of {kind} itself"
    parent = name
    while parent and parent not in float_modules:
        parent = parent.rpartition(".")[0]
    inside = f"{parent!r} ({type(float_modules[parent]).__name__})" if parent else type(float_model).__name__
    return f"{name!r} ({type(module).__name__}, inserted by the flow{_fed_by(model, name)}) inside {inside}"


def _fed_by(model: nn.Module, name: str) -> str:
    """', fed by `attention_mask`' for a module an FX graph calls on a node (an observer)."""
    if not isinstance(model, torch.fx.GraphModule):
        return ""
    node = next((n for n in model.graph.nodes if n.op == "call_module" and n.target == name), None)
    source = node.args[0] if node is not None and node.args else None
    return f", fed by `{source.name}`" if isinstance(source, torch.fx.Node) else ""


def model_failure(model: nn.Module, float_model: nn.Module, kind: str, batch: str,
                  exc: BaseException) -> ModelError:
    """The ModelError for ``model`` (described by ``kind``) failing on ``batch`` (e.g.
    'calib_data[0]'), which ``float_model`` runs."""
    name, module, line = _innermost(model, exc)
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if len(first) > 200 and ". " in first:  # torch's dispatcher errors run on: keep the first sentence
        first = first[: first.index(". ") + 1]
    advice = unsupported_op_advice(exc, name or None, torch.backends.quantized.engine)
    if advice is None:
        fix = next((advice.format(*m.groups()) for pattern, advice in _KNOWN if (m := pattern.search(str(exc)))),
                   "the flow cannot run this model as it is: leave that layer float in the plan, or try "
                   "another flow (flow='fx', 'pt2e', 'dynamic' or 'torchao')")
        advice = f"Fix: {fix}"
    return ModelError(
        f"the {kind} failed on {batch}, which the float model runs, so the data is not the problem: "
        f"in {_where(model, name, module, float_model)}{line}: {type(exc).__name__}: {first.rstrip('.')}. {advice}"
    )
