"""Per-layer sensitivity: what quantizing each layer costs the model, measured one layer at a time.

For every layer, four mixed models are measured on the session's evaluation batches:

- ``quantize_only``: the float model with only this layer quantized;
- ``skip_only``: the quantized model with only this layer left float;
- ``weight_only``: the float model with only this layer's weight quantized;
- ``activation_only``: the float model with only this layer's output activation quantized.

The metric is the model output's SQNR (dB) against the float model, or ``eval_fn(model)``.

How the mixed models are built: nothing is calibrated or converted again. Each one is the
session's float reference (fused, BN folded, same module names) or its quantized model with ONE
module swapped: the quantized layer taken from the quantized model between a quantize (with the
input qparams that layer receives in the quantized model) and a dequantize; the float layer
with the quantized layer's dequantized weights; the float layer followed by a quantize-dequantize
with the layer's output qparams; or the float layer inside the quantized model (its input
dequantized, its output quantized again for its consumers, as ``Session.apply`` leaves a float
layer). Every qparam is the one the quantized model already uses, so the figures agree with
``Session.apply`` of the same plan (tests/test_sensitivity.py checks it), at a fraction of the cost.

Speed: on FX graph modules without in-place ops, one plain run per batch keeps every node's value
(within ``cache_bytes``) and each mixed model recomputes only the nodes downstream of the swapped
layer. Other models (Hugging Face ones, say) get the same saving module by module: one plain
run per batch keeps a copy of each module's output, and a mixed model hands back those of the
modules that finished before the swapped layer started instead of running them (see
:class:`_Prefix`). Work units are picklable (``executor=`` any ``concurrent.futures.Executor``); each unit
rebuilds its own caches.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import operator
import os
import pickle
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from qviz.analysis.compare import _float, choose_output, model_output, quantized_weights
from qviz.analysis.metrics import ErrorAccumulator
from qviz.errors import ConfigError, QvizError, SweepError
from qviz.flows.base import call_model, positional, quantized_engine
from qviz.flows.torch_ao.rebuild import FloatLayer, feeds_only_dequantize
from qviz.flows.tracing import TRACE_LOCK, one_trace_at_a_time
from qviz.heap import is_large, release_freed_memory
from qviz.torch_warnings import quiet_torch

VARIANTS = ("quantize_only", "skip_only", "weight_only", "activation_only")
COLUMNS = ("rank", *VARIANTS, "sensitivity", "float_metric")
DEFAULT_METRIC = "output_sqnr"


@dataclass(frozen=True, eq=False)
class Sensitivity:
    """The sweep: ``metric`` and a frame indexed by layer, most sensitive first (see COLUMNS).

    ``sensitivity`` is ``-quantize_only`` for the default metric (the output noise, in dB relative
    to the signal, that this layer alone adds: the float model's SQNR is infinite) and
    ``float_metric - quantize_only`` for an ``eval_fn`` (higher is better).
    """

    metric: str
    frame: pd.DataFrame = field(repr=False)
    failed: dict[str, str] = field(default_factory=dict)  # layer -> why eval_fn failed on it
    nonfinite: tuple[str, ...] = ()  # layers whose metric came out NaN/Inf (ranked last)

    def to_dataframe(self) -> pd.DataFrame:
        frame = self.frame.copy()
        frame.attrs["metric"] = self.metric
        if self.failed:
            frame.attrs["failed"] = dict(self.failed)
        if self.nonfinite:
            frame.attrs["nonfinite"] = list(self.nonfinite)
        return frame

    @classmethod
    def from_frame(cls, frame: pd.DataFrame) -> Sensitivity:
        """A stored sweep (``results.sensitivity``), its metric read from ``frame.attrs``."""
        return cls(frame.attrs.get("metric", DEFAULT_METRIC), frame.copy())


# -- the swapped-in modules ----------------------------------------------------------------------
class QuantizedOnly(nn.Module):
    """A quantized layer inside a float model: its input quantized as in the quantized model
    (``input_qparams`` = (scale, zero_point, dtype), None for dynamic layers), output dequantized."""

    def __init__(self, layer: nn.Module, input_qparams: tuple | None):
        super().__init__()
        self.layer, self.input_qparams = layer, input_qparams

    def forward(self, x, *rest, **kwargs):
        if self.input_qparams is not None:
            x = torch.quantize_per_tensor(x, *self.input_qparams)
        out = self.layer(x, *rest, **kwargs)
        return out.dequantize() if isinstance(out, torch.Tensor) and out.is_quantized else out


class FakeQuantOutput(nn.Module):
    """A float layer whose output is quantized and dequantized with ``qparams``."""

    def __init__(self, layer: nn.Module, qparams: tuple):
        super().__init__()
        self.layer, self.qparams = layer, qparams

    def forward(self, *args, **kwargs):
        return torch.quantize_per_tensor(self.layer(*args, **kwargs), *self.qparams).dequantize()


def weight_quantized(reference_layer: nn.Module, quantized_layer: nn.Module) -> nn.Module | None:
    """A copy of the float layer computing with the quantized layer's weights (dequantized);
    None when the weights cannot be matched by name. The copy shares the float layer's
    parameters and is given new weight tensors (an LM head's weight is not copied to be
    overwritten)."""
    module = copy.deepcopy(reference_layer, {id(p): p for p in reference_layer.parameters()})
    holder = module
    if not isinstance(getattr(module, "weight", None), torch.Tensor) and isinstance(module, nn.Sequential):
        holder = module[0]  # a fused float module (ConvReLU2d, LinearReLU, ...)
    fake_quant = getattr(holder, "weight_fake_quant", None)
    if fake_quant is not None:  # QAT: weights are BN-folded inside forward; let its fake-quant act
        fake_quant.fake_quant_enabled.fill_(1)
        fake_quant.observer_enabled.fill_(0)
        return module
    params = dict(holder.named_parameters(recurse=False))
    weights = quantized_weights(quantized_layer)
    if not weights or any(k not in params for k in weights):
        return None
    for k, w in weights.items():
        value = _float(w).detach().reshape(params[k].shape).to(params[k].dtype)
        setattr(holder, k, nn.Parameter(value, requires_grad=params[k].requires_grad))
    return module


# -- running models with a module swapped ---------------------------------------------------------
_INPLACE_FUNCTIONS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                      operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
                      operator.ilshift, operator.irshift, operator.imatmul, operator.setitem}


def _mutates(node: torch.fx.Node, gm: torch.fx.GraphModule) -> bool:
    """Might ``node`` write into one of its inputs (which would corrupt cached values)?"""
    if node.kwargs.get("inplace"):
        return True
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return node.target in _INPLACE_FUNCTIONS or (name.endswith("_") and not name.startswith("_"))
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("_")
    if node.op == "call_module":
        return bool(getattr(gm.get_submodule(node.target), "inplace", False))
    return False


class _Values(torch.fx.Interpreter):
    """Runs a GraphModule node by node keeping every value; re-runs only what a swap changes."""

    def __init__(self, gm: torch.fx.GraphModule):
        super().__init__(gm, garbage_collect_values=False)
        self.order = {n: i for i, n in enumerate(gm.graph.nodes)}
        self.calls: dict[str, list[torch.fx.Node]] = {}
        for n in gm.graph.nodes:
            if n.op == "call_module":
                self.calls.setdefault(n.target, []).append(n)
        self.output_node = next(n for n in gm.graph.nodes if n.op == "output")
        self.swaps: dict[str, nn.Module] = {}
        self._downstream: dict[tuple, list[torch.fx.Node]] = {}

    def call_module(self, target, args, kwargs):
        module = self.swaps.get(target)
        return super().call_module(target, args, kwargs) if module is None else module(*args, **kwargs)

    def values(self, batch, swaps: dict) -> dict:
        """Every node's value on ``batch`` with ``swaps`` in place."""
        self.swaps = swaps
        try:
            self.run(*positional(self.module, batch))
            return self.env
        finally:
            self.swaps, self.env = {}, {}

    def rerun(self, env: dict, swaps: dict):
        """The output with ``swaps`` in place, recomputing only the nodes they reach."""
        key = tuple(sorted(swaps))
        if key not in self._downstream:
            reached, todo = set(), [n for t in key for n in self.calls[t]]
            while todo:
                n = todo.pop()
                if n not in reached:
                    reached.add(n)
                    todo.extend(n.users)
            self._downstream[key] = sorted(reached, key=self.order.__getitem__)
        self.env, self.swaps = dict(env), swaps
        try:
            for n in self._downstream[key]:
                self.env[n] = self.run_node(n)
            return self.graph.process_outputs(self.env[self.output_node])
        finally:
            self.swaps, self.env = {}, {}


def _nbytes(values) -> int:
    tensors = {id(v): v for v in values if isinstance(v, torch.Tensor)}
    return sum(t.nelement() * t.element_size() for t in tensors.values())


def _put(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, module)


@contextlib.contextmanager
def _swapped(model: nn.Module, swaps: dict):
    """``with _swapped(model, {name: module}):`` the modules in place, the old ones back after,
    whatever is raised (KeyboardInterrupt included, in the block or while putting them back)."""
    old = {}
    try:
        for name, module in swaps.items():
            old[name] = model.get_submodule(name)  # noted first, so always put back
            _put(model, name, module)
        yield model
    finally:
        interrupted = None
        while old:  # an interrupt while putting back: finish putting back, then raise it
            try:
                _put(model, *next(iter(old.items())))
                old.pop(next(iter(old)))
            except BaseException as exc:  # noqa: B036 - re-raised below
                interrupted = exc
        if interrupted is not None:
            raise interrupted


_OPAQUE = object()


def _copied(value):
    """A copy of a module's output (tensors cloned, in tuples, lists and dicts), _OPAQUE for
    anything else holding state (a ModelOutput, a cache object): that is not handed back."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if value is None or type(value) in (bool, int, float, str):
        return value
    if type(value) in (tuple, list):
        items = [_copied(v) for v in value]
        return _OPAQUE if any(v is _OPAQUE for v in items) else type(value)(items)
    if type(value) is dict:
        items = {k: _copied(v) for k, v in value.items()}
        return _OPAQUE if any(v is _OPAQUE for v in items.values()) else items
    return _OPAQUE


_MISSING = object()


@contextlib.contextmanager
def _replaying(model: nn.Module, outputs: dict):
    """Modules of ``model`` hand back a copy of their recorded output (``outputs``: name ->
    output) instead of computing it: their ``forward`` is shadowed on the instance, so they stay
    where they are with their attributes (parents may read them); restored after, whatever is
    raised."""
    shadowed = []
    try:
        for name, output in outputs.items():
            module = model.get_submodule(name)
            shadowed.append((module, module.__dict__.get("forward", _MISSING)))
            module.forward = lambda *args, _output=output, **kwargs: _copied(_output)
        yield model
    finally:
        for module, before in reversed(shadowed):
            if before is _MISSING:
                del module.forward
            else:
                module.forward = before


class _Prefix:
    """A model's plain run on one batch, module by module: when each module's call started and
    ended, and a copy of the output of each module called once. With layer L swapped, every
    module that ended before L started computes exactly what it did (modules in eval mode are
    functions of their inputs and parameters): :meth:`replays` gives the outermost of those and
    their outputs, to hand back (:func:`_replaying`), so a mixed model computes only from L on
    (half the model for an average layer). Kept for the modules that can stand in for some of
    ``targets`` only, and used only if replaying gives the plain output bit for bit (a module
    with side effects that later ones read would not)."""

    def __init__(self, model: nn.Module, batch, targets, output_fn):
        start, end, outputs, calls, clock = {}, {}, {}, {}, iter(range(2**62))

        def before(name):
            def hook(module, args):
                calls[name] = calls.get(name, 0) + 1
                start.setdefault(name, next(clock))
            return hook

        def after(name):
            def hook(module, args, output):
                end[name] = next(clock)
                outputs[name] = _copied(output)
            return hook

        handles = []
        try:
            for name, module in model.named_modules():
                if name:
                    handles.append(module.register_forward_pre_hook(before(name)))
                    handles.append(module.register_forward_hook(after(name)))
            self.output = model_output(call_model(model, batch), output_fn)
        finally:
            for h in handles:
                h.remove()
        self.start, self.end = start, end
        self.outputs = {n: o for n, o in outputs.items() if calls[n] == 1 and o is not _OPAQUE}
        needed = set().union(*(self._outermost({t}) for t in targets if t in start))
        self.outputs = {n: o for n, o in self.outputs.items() if n in needed}
        self.nbytes = _nbytes(_leaves(list(self.outputs.values())))

    def _outermost(self, swaps) -> list[str]:
        begin = min(self.start.get(n, -1) for n in swaps)
        done = {n for n in self.outputs if self.end[n] < begin}
        return [n for n in done if not any(n.startswith(d + ".") for d in done)]

    def replays(self, swaps) -> dict:
        """Module name -> recorded output, for the outermost modules done before ``swaps``."""
        return {n: self.outputs[n] for n in self._outermost(swaps)}

    def faithful(self, model: nn.Module, batch, targets, output_fn) -> bool:
        """Whether replaying what stands in for the middle and the last of ``targets`` (nothing
        swapped) gives the plain output exactly."""
        ran = sorted((t for t in targets if t in self.start), key=self.start.__getitem__)
        for t in {ran[len(ran) // 2], ran[-1]} if ran else ():
            try:
                with _replaying(model, self.replays({t})):
                    out = model_output(call_model(model, batch), output_fn)
            except Exception:  # noqa: BLE001 - a model that cannot be replayed runs in full
                return False
            if not (out.shape == self.output.shape and torch.equal(out, self.output)):
                return False
        return True


def _leaves(value) -> list:
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _leaves(v)]
    if isinstance(value, dict):
        return _leaves(list(value.values()))
    return [value]


class _Runner:
    """One model's outputs on the evaluation batches with modules swapped in by name;
    ``targets``: the names that will be swapped (what a :class:`_Prefix` keeps outputs for)."""

    def __init__(self, model: nn.Module, batches: list, budget: int, output_fn=None, targets=()):
        self.model, self.batches, self.budget, self.output_fn = model, batches, budget, output_fn
        graph = isinstance(model, torch.fx.GraphModule) and not any(_mutates(n, model) for n in model.graph.nodes)
        self.values = _Values(model) if graph else None
        self.targets = list(targets)
        self.envs: dict[int, dict] = {}  # batch -> node values of the plain run, while they fit
        self.prefixes: dict[int, _Prefix | None] = {}  # batch -> module outputs of the plain run
        self.plain: dict[int, torch.Tensor] = {}  # batch -> plain output
        self.kept = 0

    def output(self, i: int, swaps: dict) -> torch.Tensor:
        if self.values is not None and all(t in self.values.calls for t in swaps):
            env = self._env(i)
            if env is not None:
                return model_output(self.values.rerun(env, swaps), self.output_fn) if swaps else self.plain[i]
        prefix = self._prefix(i) if self.values is None else None  # its plain run fills self.plain
        if not swaps and i in self.plain:
            return self.plain[i]
        replays = prefix.replays(swaps) if prefix is not None and swaps else {}
        with _swapped(self.model, swaps), _replaying(self.model, replays):
            out = model_output(call_model(self.model, self.batches[i]), self.output_fn)
        if not swaps:
            self.plain[i] = out
        return out

    def _prefix(self, i: int) -> _Prefix | None:
        """The module outputs of the plain run on batch ``i`` (that run gives its plain output);
        None where they do not fit the budget or do not replay faithfully."""
        if i not in self.prefixes:
            prefix = _Prefix(self.model, self.batches[i], self.targets, self.output_fn)
            self.plain[i] = prefix.output
            keep = self.kept + prefix.nbytes <= self.budget and prefix.faithful(
                self.model, self.batches[i], self.targets, self.output_fn)
            self.prefixes[i] = prefix if keep else None
            self.kept += prefix.nbytes if keep else 0
        return self.prefixes[i]

    def _env(self, i: int) -> dict | None:
        """Node values of the plain run on batch ``i``; None where they did not fit the budget."""
        if i in self.plain:
            return self.envs.get(i)
        env = self.values.values(self.batches[i], {})
        self.plain[i] = model_output(self.values.graph.process_outputs(env[self.values.output_node]), self.output_fn)
        size = _nbytes(env.values())
        if self.kept + size > self.budget:
            return None
        self.envs[i], self.kept = env, self.kept + size
        return env


# -- the sweep ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Spec:
    """What one layer looks like in the quantized model: (scale, zero_point, dtype) of its input
    and output (None where float), and the qparams its float stand-in re-quantizes with."""

    input_qparams: tuple | None
    output_qparams: tuple | None
    requantize: tuple | None


def _qparams(value) -> tuple | None:
    t = choose_output(value)
    if isinstance(t, torch.Tensor) and t.is_quantized and t.qscheme() in (torch.per_tensor_affine,
                                                                         torch.per_tensor_symmetric):
        return float(t.q_scale()), int(t.q_zero_point()), t.dtype
    return None


def _specs(quantized: nn.Module, layers: list[str], batches: list) -> dict[str, _Spec]:
    """Each layer's input/output qparams, read off the quantized model running the batches."""
    seen: dict[str, tuple] = {}

    def hook(name):
        def record(module, args, output):
            seen.setdefault(name, (_qparams(args[0]) if args else None, _qparams(output)))
        return record

    handles = []
    try:  # registered inside the try: an interrupt between two registrations leaves no hook
        for n in layers:
            handles.append(quantized.get_submodule(n).register_forward_hook(hook(n)))
        with TRACE_LOCK.running():
            for batch in batches:
                if len(seen) == len(layers):
                    break
                call_model(quantized, batch)
    finally:
        interrupted = None
        while handles:  # an interrupt while removing: finish removing, then raise it
            try:
                handles[-1].remove()
                handles.pop()
            except BaseException as exc:  # noqa: B036 - re-raised below
                interrupted = exc
        if interrupted is not None:
            raise interrupted
    specs = {}
    for n in layers:
        inp, out = seen.get(n, (None, None))
        requant = None if out is None or feeds_only_dequantize(quantized, n) else out[:2]
        specs[n] = _Spec(inp, out, requant)
    return specs


class _Sweep:
    """The per-layer work: picklable (models travel sanitized, see :func:`_dumps`)."""

    def __init__(self, reference, quantized, batches, specs, eval_fn, backend, cache_bytes, output_fn=None):
        self.reference, self.quantized, self.batches = reference, quantized, batches
        self.specs, self.eval_fn, self.backend, self.cache_bytes = specs, eval_fn, backend, cache_bytes
        self.output_fn = output_fn
        self.private = False  # True once this copy's models belong to it alone
        self._payload: bytes | None = None
        self._runners: dict[str, _Runner] = {}

    def __reduce__(self):
        if self._payload is None:
            state = (self.reference, self.quantized, self.batches, self.specs, self.eval_fn,
                     self.backend, self.cache_bytes, self.output_fn)
            self._payload = _dumps(state)
        return _unpack, (self._payload,)

    def copy(self) -> _Sweep:
        """A private copy (models included), for a work unit running beside others."""
        kind, args = self.__reduce__()
        return kind(*args)

    def runner(self, which: str) -> _Runner:
        if which not in self._runners:
            self._runners[which] = _Runner(getattr(self, which), self.batches, self.cache_bytes // 2, self.output_fn,
                                           targets=list(self.specs))
        return self._runners[which]

    def metric(self, which: str, swaps: dict) -> float:
        """The metric of model ``which`` ("reference" or "quantized") with ``swaps`` in place."""
        if self.eval_fn is not None:
            with _swapped(getattr(self, which), swaps) as model, TRACE_LOCK.running():
                return _number(self.eval_fn(model))
        acc, ref, run = ErrorAccumulator(), self.runner("reference"), self.runner(which)
        with TRACE_LOCK.running():
            for i in range(len(self.batches)):
                acc.add(ref.output(i, {}), run.output(i, swaps))
        return acc.result()["sqnr"]

    def measure(self, layer: str, variants=VARIANTS) -> dict[str, float]:
        """The metrics of ``variants`` for ``layer`` (NaN for the others)."""
        spec = self.specs[layer]
        ref_layer, q_layer = self.reference.get_submodule(layer), self.quantized.get_submodule(layer)
        requant = spec.requantize or (None, None)
        builders = {
            "quantize_only": lambda: ("reference", QuantizedOnly(q_layer, spec.input_qparams)),
            "skip_only": lambda: ("quantized", FloatLayer(ref_layer, *requant)),
            "weight_only": lambda: ("reference", weight_quantized(ref_layer, q_layer)),
            "activation_only": lambda: ("reference", None if spec.output_qparams is None
                                        else FakeQuantOutput(ref_layer, spec.output_qparams)),
        }
        found = dict.fromkeys(VARIANTS, math.nan)
        for name in variants:
            which, module = builders[name]()
            if module is not None:
                found[name] = self.metric(which, {layer: module})
        return found

    def measure_all(self, layers: list[str], variants=VARIANTS) -> tuple[dict, dict]:
        """(layer -> figures, layer -> the exception ``eval_fn`` raised on it): a layer whose
        eval_fn fails is set aside and the others are measured."""
        rows, failed = {}, {}
        with quiet_torch(), quantized_engine(self.backend), torch.no_grad():
            for n in layers:
                try:
                    rows[n] = self.measure(n, variants)
                except ConfigError:
                    raise  # an eval_fn returning no number fails the same on every layer
                except Exception as exc:  # noqa: BLE001 - the user's eval_fn, reported per layer
                    if self.eval_fn is None:
                        raise
                    failed[n] = exc
        return rows, failed


def _number(value) -> float:
    """eval_fn's result as a float: a real number or a one-element tensor/array."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 or isinstance(value, np.ndarray) and value.size == 1:
        return float(value.item())
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        return float(value)
    shape = f" of shape {tuple(value.shape)}" if hasattr(value, "shape") else ""
    raise ConfigError(
        f"eval_fn(model) must return a number (higher is better), got {type(value).__name__}{shape}: "
        "return e.g. accuracy as a float, or a one-element tensor"
    )


@one_trace_at_a_time  # unpickling a GraphModule traces it again
def _unpack(payload: bytes) -> _Sweep:
    job = _Sweep(*pickle.loads(payload))
    job.private, job._payload = True, payload
    return job


def _measure_chunk(job: _Sweep, layers: list[str], variants) -> tuple[dict, dict]:
    """An executor's work unit; in-process executors share the caller's objects, so they copy."""
    return (job if job.private else job.copy()).measure_all(layers, variants)


# torch 2.13 cannot pickle some of what sessions hold: quantized convs (their __setstate__ skips
# nn.Module's own state), qconfigs (local functions), GraphModules whose code annotates Tensor.
def _restore_module(cls, state):
    module = cls.__new__(cls)
    nn.Module.__init__(module)
    module.__setstate__(state)
    return module


class _Pickler(pickle.Pickler):
    def reducer_override(self, obj):
        if isinstance(obj, nn.Module) and type(obj).__getstate__ is not nn.Module.__getstate__:
            return _restore_module, (type(obj), obj.__getstate__())
        return NotImplemented


def _dumps(state) -> bytes:
    models = copy.deepcopy(state[:2])
    for model in models:
        for module in model.modules():
            module.__dict__.pop("qconfig", None)
            if isinstance(module, torch.fx.GraphModule):
                module.meta = {}
                for node in module.graph.nodes:
                    node.type = None
                module.recompile()
    buffer = io.BytesIO()
    try:
        _Pickler(buffer).dump((*models, *state[2:]))
    except (pickle.PicklingError, AttributeError, TypeError) as exc:
        raise ConfigError(
            f"executor= sends the sweep to other workers, and part of it does not pickle ({exc}): "
            "define eval_fn and output_fn at module level (not a lambda or local function), or drop executor="
        ) from exc
    return buffer.getvalue()


def _check_executor(executor) -> None:
    """Refuse a process pool that forks: a worker forked while torch's OpenMP threads are busy
    can hang for ever in its first quantized kernel (seen on 2 loaded cores)."""
    context = getattr(executor, "_mp_context", None)
    if isinstance(executor, ProcessPoolExecutor) and context is not None and context.get_start_method() == "fork":
        raise ConfigError(
            "executor= is a process pool that forks, and forked workers can hang in torch's OpenMP "
            "threads: create it with ProcessPoolExecutor(mp_context=multiprocessing.get_context('spawn'))"
            " (or 'forkserver')"
        )


def _check_variants(variants) -> tuple[str, ...]:
    variants = tuple(variants)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or "quantize_only" not in variants:
        raise ConfigError(f"variants must name some of {', '.join(VARIANTS)}, quantize_only included "
                          f"(it ranks the layers); got {variants}")
    return variants


def sweep(reference: nn.Module, quantized: nn.Module, batches: list, layers: list[str], *,
          float_layers=(), backend: str = "x86", eval_fn: Callable | None = None, executor=None,
          progress: bool = True, cache_bytes: int = 512 * 2**20,
          callback: Callable[[int, int], None] | None = None, variants=VARIANTS,
          output_fn: Callable | None = None) -> Sensitivity:
    """Measure every layer of ``layers`` (module names shared by ``reference`` and ``quantized``);
    ``float_layers`` are float in ``quantized`` already and need no work. ``callback(done, total)``
    is called after each measured layer (e.g. a dashboard's progress bar). ``variants`` limits the
    figures measured (the others are NaN; "quantize_only", which ranks, is required);
    ``output_fn`` picks the compared output (see :func:`qviz.analysis.compare.model_output`). See
    the module doc."""
    metric = DEFAULT_METRIC if eval_fn is None else getattr(eval_fn, "__name__", "eval_fn")
    _check_executor(executor)
    variants = _check_variants(variants)
    float_layers = set(float_layers)
    work = [n for n in layers if n not in float_layers]
    with quiet_torch(), quantized_engine(backend), torch.no_grad():
        job = _Sweep(reference, quantized, batches, _specs(quantized, work, batches), eval_fn,
                     backend, cache_bytes, output_fn)
        float_metric = math.inf if eval_fn is None else _float_metric(job)
        quantized_metric = job.metric("quantized", {}) if len(work) < len(layers) else math.nan
    rows = {n: {v: (quantized_metric if v == "skip_only" else float_metric) if v in variants else math.nan
                for v in VARIANTS} for n in layers if n not in work}
    failed: dict[str, BaseException] = {}

    def done(part: tuple[dict, dict], bar) -> None:
        rows.update(part[0])
        failed.update(part[1])
        bar.update(len(part[0]) + len(part[1]))
        if callback is not None:
            callback(len(rows) + len(failed) - len(layers) + len(work), len(work))

    with tqdm(total=len(work), desc="qviz: sensitivity", unit="layer", leave=False,
              disable=not progress) as bar:
        if executor is None:
            trim = is_large(reference)
            for n in work:
                done(job.measure_all([n], variants), bar)
                if trim:  # the layer's temporaries, before the next layer's (see qviz.heap)
                    release_freed_memory()
        elif work:
            workers = getattr(executor, "_max_workers", None) or os.cpu_count() or 1
            count = min(len(work), workers)
            # Threads get their copies here, before any starts: unpickling a GraphModule re-traces
            # it, and tracing patches nn.Module.__call__ for every thread. (Not before forking a
            # process pool: OpenMP threads just used by the copy can hang the forked workers.)
            jobs = [job.copy() if isinstance(executor, ThreadPoolExecutor) else job for _ in range(count)]
            futures = _submit(executor, [(unit, work[k::count], variants) for k, unit in enumerate(jobs)])
            for future in as_completed(futures):
                done(future.result(), bar)
    result = ranked({**rows, **{n: dict.fromkeys(VARIANTS, math.nan) for n in failed}}, layers, metric,
                    float_metric, by_sqnr=eval_fn is None,
                    failed={n: f"{type(e).__name__}: {e}" for n, e in failed.items()})
    if failed:
        names = [n for n in layers if n in failed]
        first = failed[names[0]]
        raise SweepError(
            f"eval_fn failed on {len(names)} of {len(work)} layers ({', '.join(names)}); first on "
            f"{names[0]!r}: {type(first).__name__}: {first}. The other layers' figures are in this "
            "error's .partial (a Sensitivity; the failed layers NaN, in .partial.failed)",
            partial=result, layers=names,
        ) from first
    return result


def _float_metric(job: _Sweep) -> float:
    """eval_fn on the float model: the figure every layer is compared with; it must work."""
    try:
        value = job.metric("reference", {})
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's eval_fn, before any layer is measured
        raise QvizError(f"eval_fn failed on the float model, before any layer was measured: "
                        f"{type(exc).__name__}: {exc}. Fix eval_fn (it is called as eval_fn(model))") from exc
    if math.isnan(value):
        raise ConfigError("eval_fn returned NaN on the float model, so no layer can be ranked against "
                          "it: check eval_fn and the data it evaluates on")
    return value


def _submit(executor, units: list[tuple]) -> list:
    """The work units submitted to ``executor``, refused clearly when it cannot take them."""
    try:
        return [executor.submit(_measure_chunk, *unit) for unit in units]
    except Exception as exc:  # noqa: BLE001 - any executor's own refusal (shut down, closed client)
        raise QvizError(
            f"executor= did not take the sweep's work ({type(exc).__name__}: {exc}): it is probably "
            "shut down or its cluster closed; pass a running executor, or drop executor="
        ) from exc


def ranked(rows: dict, layers: list[str], metric: str, float_metric: float, *, by_sqnr: bool,
           failed: dict[str, str] | None = None) -> Sensitivity:
    """The per-layer variant figures ``rows`` as a ranked :class:`Sensitivity`: what quantizing
    the layer alone costs (``-quantize_only`` dB, or the drop of the user's metric), most first.
    Layers whose figure is NaN (a NaN from eval_fn, non-finite outputs) rank last, with a warning
    naming them; ``failed`` layers (eval_fn raised) rank last too, listed apart."""
    failed = failed or {}
    frame = pd.DataFrame.from_dict({n: rows[n] for n in layers}, orient="index", columns=list(VARIANTS))
    frame = frame.astype(np.float64)
    frame["sensitivity"] = -frame["quantize_only"] if by_sqnr else float_metric - frame["quantize_only"]
    frame["float_metric"] = float_metric
    frame = frame.sort_values("sensitivity", ascending=False, kind="stable", na_position="last")
    frame.insert(0, "rank", np.arange(1, len(frame) + 1, dtype=np.int64))
    frame.index.name = "layer"
    nonfinite = tuple(n for n in frame.index[frame["quantize_only"].isna()] if n not in failed)
    if nonfinite:
        warnings.warn(f"the sensitivity of {len(nonfinite)} layer(s) is NaN, ranked last: "
                      f"{', '.join(nonfinite)} ({metric} came out NaN with the layer quantized alone: "
                      "non-finite outputs, or eval_fn returned NaN)", stacklevel=3)
    return Sensitivity(metric, frame, failed=dict(failed), nonfinite=nonfinite)


def reconversion_sweep(plan, table: pd.DataFrame, build: Callable, measure: Callable, *, float_metric: float,
                       current: float, metric: str, by_sqnr: bool, progress: bool = False, callback=None,
                       variants=VARIANTS) -> Sensitivity:
    """Per-layer sensitivity by real re-conversion, for flows whose converted model has no layer
    modules to swap (a graph): ``build(target_plan)`` converts the whole model under a plan,
    ``measure(model)`` is the metric. ``quantize_only`` is the plan with every other layer float,
    ``skip_only`` the plan with this layer float; ``weight_only`` / ``activation_only`` are NaN
    (no module to swap for a weight- or output-only variant). ``table``: the session's layer
    table (its ``quantized`` column), ``current``: the metric of the plan in force."""
    everything_float = {n: {"dtype": "float"} for n in plan}
    layers, rows = list(table.index), {}
    for n in tqdm(layers, desc="qviz: sensitivity", unit="layer", leave=False, disable=not progress):
        rows[n] = dict.fromkeys(VARIANTS, math.nan)
        if not table.loc[n, "quantized"]:  # already float: quantizing it alone changes nothing
            rows[n].update(quantize_only=float_metric, skip_only=current)
        else:
            rows[n]["quantize_only"] = measure(build(plan.with_changes({**everything_float, n: {"dtype": plan[n].dtype}})))
            if "skip_only" in variants:
                rows[n]["skip_only"] = measure(build(plan.with_changes({n: {"dtype": "float"}})))
        if callback is not None:
            callback(len(rows), len(layers))
    return ranked(rows, layers, metric, float_metric, by_sqnr=by_sqnr)
