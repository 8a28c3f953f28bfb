"""Session: the one facade users, views and reports talk to.

``Session(model, calib_data, flow=..., backend=...).run()`` prepares a deep copy of the model,
calibrates it with probes on every quantization point, converts it and compares it layer by
layer with the float reference. What it keeps is plain data (a frame, a summary dict, point
records with numpy arrays), so a session saves to a file and loads without the model.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import pathlib
import warnings
from collections.abc import Iterable

import numpy as np
import pandas as pd
import torch
from torch import nn

from qviz.analysis.algorithms import METHODS, compare_algorithms
from qviz.analysis.compare import Comparator, model_output, serialized_size, weight_record
from qviz.analysis.diagnosis import Thresholds, diagnose
from qviz.analysis.groups import DEFAULT_GROUP_SIZE, layer_groups
from qviz.analysis.latency import median_latency_ms
from qviz.analysis.outliers import collect as collect_outliers
from qviz.analysis.outliers import outlier_frame
from qviz.analysis.search import search, weight_bytes
from qviz.analysis.sensitivity import (
    DEFAULT_METRIC,
    VARIANTS,
    Sensitivity,
    reconversion_sweep,
    sweep,
)
from qviz.analysis.table import build_results
from qviz.capture.probes import describe, probing
from qviz.errors import ConfigError, InputDataError, QvizError
from qviz.flows.base import Calibration, call_model, quantized_engine, split_batch, swap_module
from qviz.flows.failure import model_failure
from qviz.flows.registry import DEFAULT_FLOW, flow_class, flow_names, make_flow
from qviz.flows.tracing import TRACE_LOCK
from qviz.heap import is_large, release_freed_memory
from qviz.io.results_file import load_results, save_results
from qviz.plan import Plan
from qviz.progress import progress_bar
from qviz.results import PointRecord, Results, output_record
from qviz.torch_warnings import quiet_torch
from qviz.version import __version__


def _batches(data, what: str) -> list:
    """Materialise an iterable of batches (tensors, tuples of positional inputs or mappings of
    keyword inputs, see :func:`qviz.flows.base.split_batch`); refuse empty data."""
    if isinstance(data, torch.Tensor):
        raise InputDataError(
            f"{what} must be an iterable of batches, not one tensor: pass [tensor] for a single "
            "batch, or a DataLoader"
        )
    try:
        batches = iter(data)
    except TypeError as exc:
        raise InputDataError(f"{what} must be an iterable of batches (a list or DataLoader): {exc}") from exc
    found = []
    try:
        for batch in batches:
            found.append(batch)
    except Exception as exc:  # noqa: BLE001 - the user's own iterable raised: say so, as it is
        raise InputDataError(
            f"iterating {what} raised {type(exc).__name__} while producing {what}[{len(found)}]: {exc} "
            "(the error comes from your data iterable or DataLoader; see the traceback above)"
        ) from exc
    if not found:
        raise InputDataError(f"{what} is empty: give at least one batch (a tensor, a tuple or a dict of inputs)")
    for i, batch in enumerate(found):
        args, kwargs = split_batch(batch)
        if not any(isinstance(a, torch.Tensor) for a in (*args, *kwargs.values())):
            raise InputDataError(
                f"{what}[{i}] holds no tensor ({type(batch).__name__}): each batch is a tensor, a tuple "
                "of the model's positional inputs or a dict of its keyword inputs; drop labels with a generator"
            )
    return found


def _shapes(batch) -> str:
    args, kwargs = split_batch(batch)
    shape = lambda a: str(tuple(a.shape)) if isinstance(a, torch.Tensor) else type(a).__name__  # noqa: E731
    return ", ".join([*map(shape, args), *(f"{k}={shape(v)}" for k, v in kwargs.items())])


def _float_model_runs(float_model: nn.Module, batch) -> bool:
    """Whether the user's float model runs on ``batch`` (a copy in eval mode: BN stays as it is)."""
    try:
        with torch.no_grad(), TRACE_LOCK.running():
            call_model(copy.deepcopy(float_model).eval(), batch)
    except Exception:  # noqa: BLE001 - any failure means the batch does not fit the model
        return False
    return True


def run_batch(model: nn.Module, batch, what: str, index: int, first, float_model: nn.Module | None = None,
              kind: str = "quantized model"):
    """The model on ``batch``, ``what[index]``. A failure is the data's (InputDataError, with the
    shapes of this and the first batch) only when ``float_model`` fails on the batch too, else
    the model's (ModelError naming the module that raised, see :mod:`qviz.flows.failure`)."""
    try:
        with TRACE_LOCK.running():
            return call_model(model, batch)
    except QvizError:
        raise
    except Exception as exc:  # noqa: BLE001 - torch raises many types; each is explained below
        if float_model is not None and _float_model_runs(float_model, batch):
            raise model_failure(model, float_model, kind, f"{what}[{index}]", exc) from exc
        raise InputDataError(
            f"the model failed on {what}[{index}] with inputs of shape {_shapes(batch)} "
            f"(the first batch had {_shapes(first)}): {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}. Check that every batch is what the model "
            "accepts: model(*batch) for a tuple, model(**batch) for a dict"
        ) from exc


class Session:
    """Debug one quantization of ``model``: see the module docstring and the README."""

    def __init__(
        self,
        model: nn.Module,
        calib_data: Iterable,
        *,
        flow: str = DEFAULT_FLOW,
        backend: str = "x86",
        example_inputs=None,
        eval_data: Iterable | None = None,
        plan=None,
        qconfig=None,
        qconfig_mapping=None,
        fuse="auto",
        dynamic_dtype: str = "int8",
        scheme: str | None = None,
        group_size: int | None = 32,
        quantizer=None,
        flow_options: dict | None = None,
        progress: bool = True,
        cache_bytes: int = 512 * 2**20,
        latency: bool = False,
        output_fn=None,
    ):
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        given = {"qconfig": qconfig, "qconfig_mapping": qconfig_mapping, "fuse": fuse,
                 "dynamic_dtype": dynamic_dtype, "scheme": scheme, "group_size": group_size, "quantizer": quantizer}
        taken = flow_class(flow).session_options  # the flow's share of the keywords above
        self.flow = make_flow(flow, backend, **{taken[k]: v for k, v in given.items() if k in taken},
                              **(flow_options or {}))
        self.backend = backend
        self._model = model
        self._calib = _batches(calib_data, "calib_data")
        self._eval = _batches(eval_data, "eval_data") if eval_data is not None else self._calib[:1]
        self._eval_name = "eval_data" if eval_data is not None else "calib_data"  # for messages
        self._example = example_inputs if example_inputs is not None else self._calib[0]
        if output_fn is not None and not callable(output_fn):
            raise ConfigError(f"output_fn must be a callable (model output -> tensor), not {type(output_fn).__name__}")
        self.output_fn = output_fn
        if plan is not None and not isinstance(plan, Plan):
            raise ConfigError(f"plan must be a qviz.Plan (see Plan.from_json), not {type(plan).__name__}")
        if plan is not None and (qconfig is not None or qconfig_mapping is not None):
            raise ConfigError("give either plan= or qconfig/qconfig_mapping, not both")
        self.plan = plan
        self.source = None  # the session file it was loaded from (see load())
        self.progress = progress
        self.cache_bytes = cache_bytes
        self.latency = latency
        self.results: Results | None = None
        self._history: list[Plan] = []

    # -- running -------------------------------------------------------------------------------
    def run(self) -> Session:
        """Prepare, calibrate with capture, convert and compare; returns ``self``."""
        with quiet_torch(say_deprecation=self.flow.deprecated), quantized_engine(self.backend):
            if self.plan is not None:  # a plan given to the constructor drives the first conversion
                self.flow.use_plan(self.plan)
            observed = self.flow.prepare(self._model, self._example)
            points = self.flow.quant_points(observed)
            reference = self.flow.reference(observed, points)
            with probing(points) as records:
                with torch.no_grad():
                    for i, batch in enumerate(progress_bar(self._calib, "calibrating", self.progress)):
                        run_batch(observed, batch, "calib_data", i, self._calib[0], self._model,
                                  "model prepared for calibration")
            self._clip_percentiles(points, records)
            for p in points:
                if p.role != "dynamic":
                    describe(records[p.name], p.module)
            self._name_percentiles(points, records)
            self._initial = {name: dict(r.arrays) for name, r in records.items()}
            quantized = self.flow.convert(observed)
            layers, left_float = self.flow.find_layers(quantized, reference)
            if not layers and not left_float:
                raise ConfigError(
                    f"no layer of this model was quantized by flow={self.flow.name!r}: qviz measures "
                    f"layers with weights, and this flow quantizes {self.flow.quantizes}."
                    " Is the model made of such modules (not functional calls on tensors of its own)?"
                )
            self._reference, self._quantized, self._records = reference, quantized, records
            self._layers, self._left_float = layers + left_float, left_float
            self._comparator = Comparator(
                reference, self._layers, self._eval, cache_bytes=self.cache_bytes, output_fn=self.output_fn,
                call=lambda model, batch, i: run_batch(
                    model, batch, self._eval_name, i, self._eval[0], self._model,
                    "float reference (fused like the quantized model)" if model is self._reference
                    else "quantized model"),
            )
            self._weights, trim = {}, is_large(reference)
            for n in layers:  # a large model's dequantized temporaries handed back layer by layer
                self._weights[n] = weight_record(quantized.get_submodule(n), reference.get_submodule(n))
                if trim:
                    release_freed_memory()
            self._per_layer, self._model_figures = self._comparator.compare(quantized)
            self._warn_nonfinite()
            self._float_size = serialized_size(self._model)
            self._float_latency_ms = median_latency_ms(reference, self._eval[0]) if self.latency else None
            self._init_plan()
            self.results = self._build_results()
        self._warn_left_float(left_float)
        release_freed_memory()  # the flow's temporaries (see qviz.heap)
        return self

    def _clip_percentiles(self, points, records) -> None:
        """Layers whose plan asks for a percentile clip: set their observers' range from the
        recorded histogram (torch has no percentile observer; the plan gives a MinMaxObserver)."""
        if self.plan is None:
            return
        for p in points:
            config = self.plan.get(p.layer) if p.layer in self.plan else None
            if p.role == "output" and config is not None and config.activation == "percentile":
                stats = records[p.name].stats
                if stats.saw_data:
                    lo, hi = stats.histogram.quantile([(100 - config.percentile) / 100, config.percentile / 100])
                    p.module.min_val.fill_(float(lo))
                    p.module.max_val.fill_(float(hi))

    def _name_percentiles(self, points, records) -> None:
        """A percentile clip's record says so ("percentile(99.99)", as apply() writes it), not
        the MinMaxObserver torch holds for it."""
        for p in points:
            config = self.plan.get(p.layer) if self.plan is not None and p.layer in self.plan else None
            if p.role == "output" and config is not None and config.activation == "percentile":
                records[p.name].info["observer"] = percentile_name(config)

    def _init_plan(self) -> None:
        """The plan in force: the given one (float layers applied now), or the backend default."""
        self._owns_qconfigs = self.flow.owns_configs
        if self.plan is None:
            self.plan = self._run_plan = self.flow.default_plan(self._model, self._layers, self._left_float)
            return
        missing = [n for n in self._layers if n not in self.plan]
        if missing:
            raise ConfigError(f"the plan has no config for layers {missing}: was it made for another model?")
        float_now = {n: c for n, c in self.plan.items() if c.dtype == "float" and n not in self._left_float}
        self._run_plan = self.plan.with_changes({n: {"dtype": "int8"} for n in float_now})
        if float_now and not self.flow.converts_float_layers:  # they ran quantized: apply them now
            target, self.plan = self.plan, self._run_plan
            self._apply_plan(target, [*self._history, self.plan])

    def _build_results(self) -> Results:
        summary = dict(self._model_figures)
        summary["size_bytes"] = serialized_size(self._quantized)
        summary["float_size_bytes"] = self._float_size
        counts = self.param_counts()  # the size figure every screen shows: see weight_bytes()
        summary["weight_bytes"] = weight_bytes(counts, self.plan, float_layers=self._left_float)
        summary["float_weight_bytes"] = weight_bytes(counts, None)
        summary["nonfinite"] = sum(r.stats.nonfinite for r in self._records.values())
        summary["left_float"] = list(self._left_float)
        if self._float_latency_ms is not None:  # opt-in: Session(..., latency=True)
            summary["float_latency_ms"] = self._float_latency_ms
            summary["latency_ms"] = median_latency_ms(self._quantized, self._eval[0])
        float_layers = [n for n in self._layers if n in self._left_float
                        or (self.plan is not None and n in self.plan and self.plan[n].dtype == "float")]
        results = build_results(
            meta={"flow": self.flow.name, "backend": self.backend, "torch": torch.__version__,
                  "qviz": __version__, **self.flow.meta},
            records=self._records, per_layer=self._per_layer,
            weights={n: w for n, w in self._weights.items() if n not in float_layers},
            order=self._comparator.order, left_float=float_layers, summary=summary,
            types={n: self._layer_type(n) for n in self._layers},
            simulated=[n for n in self._layers if (self.plan is not None and n in self.plan
                       and self.plan[n].simulated) or getattr(self._quantized.get_submodule(n), "simulated", "")],
        )
        table = results.table
        for n in self._layers:  # an int4 layer stored in 8 bits says int4 first, then how it is held
            if self.plan is not None and n in self.plan and self.plan[n].dtype == "int4":
                for column in ("dtype", "weight_dtype"):
                    label = str(table.loc[n, column])
                    if "int8" in label:
                        table.loc[n, column] = f"int4 (simulated in {label})"
        for n in self._layers:  # why a quantized row has no output scale (pt2e: see output_notes)
            note = getattr(self._quantized.get_submodule(n), "output_note", "")
            if note and table.loc[n, "quantized"] and not table.loc[n, "observer"]:
                table.loc[n, "observer"] = note
        return results

    def _layer_type(self, name: str) -> str:
        """The layer's class as the user knows it: the converted module's, the wrapped one's for
        a layer left float by apply(), the float model's where FX kept a traced-through module
        (timm's BatchNormAct2d, ...) as a plain nn.Module container."""
        try:
            float_layer = self._model.get_submodule(name)
        except AttributeError:  # a functional op, a layer a flow made (fused, traced)
            float_layer = None
        return self.flow.layer_type(self._quantized.get_submodule(name), float_layer)

    # -- what-if -------------------------------------------------------------------------------
    @property
    def editable(self) -> dict[str, tuple | None] | None:
        """The plan fields this session's flow honours, with their allowed values (None: any);
        None when every field applies (fx, eager). The dashboard's editor offers only these."""
        return getattr(self.flow, "editable", None)

    @property
    def is_live(self) -> bool:
        """True when the session holds its models (run here), False when loaded from a file."""
        return self._model is not None

    @property
    def can_apply(self) -> bool:
        """True when this session holds models and owns the qconfigs, so apply() can work."""
        return (self.results is not None and self._model is not None and self.flow.can_edit
                and self._owns_qconfigs)

    def apply(self, changes) -> Session:
        """Change some layers' configs (a Plan, or {layer: {field: value}}) and re-convert live.

        Qparams come from the statistics recorded at calibration (no calibration pass); only the
        changed layers are rebuilt, and only they and the layers after them are re-measured.
        """
        if not self.can_apply:
            raise ConfigError(self._why_no_apply())
        if isinstance(changes, Plan):
            missing, extra = set(self.plan) - set(changes), set(changes) - set(self.plan)
            if missing or extra:
                raise ConfigError(
                    f"this plan was made for another model: it lacks layers {sorted(missing)} and "
                    f"has layers this model does not have {sorted(extra)}"
                )
            target = changes
        else:
            target = self.plan.with_changes(changes)
        with quiet_torch(), quantized_engine(self.backend):
            self._apply_plan(target, [*self._history, self.plan])
        return self

    def _why_no_apply(self) -> str:
        if self.results is None:
            return "this session has not run yet: call session.run() first"
        if self._model is None:
            return "a session loaded from a file holds results only: re-create it from the model to apply plans"
        if not self.flow.can_edit:
            editing = [n for n in flow_names() if flow_class(n).can_edit]
            return f"flow {self.flow.name!r} cannot re-convert layers live: apply() works with flow {', '.join(map(repr, editing))}"
        return ("apply() needs qviz to own the qconfigs: pass plan=... (see qviz.Plan) instead of "
                "your own qconfig, qconfig_mapping or quantizer, and give the float model rather than a prepared one")

    def _apply_plan(self, target: Plan, history: list[Plan]) -> None:
        """Re-convert to ``target`` as one transaction, ``history`` the undo list after it.

        Everything new (model, per-layer figures, weights, records, plan, results) is computed
        into locals and committed by one ``__dict__.update``; until then the session is
        untouched, and the modules swapped into the live quantized model (eager, torchao) are
        swapped back on any exception, KeyboardInterrupt included: an interrupted apply()
        leaves the session exactly as it was.
        """
        changed = self.plan.diff(target)
        if not changed:
            return
        self.flow.check_plan(target, {n: self._reference.get_submodule(n) for n in changed})
        reconversion = self.flow.reconvert(target, changed, self._calibration())
        quantized = reconversion.quantized
        try:
            first = min(self._comparator.order.index(n) for n in changed)
            hooks = {n: m for n in self._layers if (m := self.flow.measured_module(quantized, n)) != n}
            per_layer, figures = self._comparator.compare(quantized, self._comparator.order[first:], hook_names=hooks)
            weights, records = dict(self._weights), dict(self._records)
            for n in changed:
                if target[n].dtype != "float":
                    module = quantized.get_submodule(n)
                    weights[n] = weight_record(module, self._reference.get_submodule(n))
                    record = self._output_record(n)
                    if record is not None and hasattr(module, "scale"):
                        records[record.name] = _output_record_for(record, module, target[n])
            still_float = set(self.flow.find_layers(quantized, self._reference)[1])
            new = {
                "_quantized": quantized, "_weights": weights, "_records": records,
                "_per_layer": {**self._per_layer, **per_layer}, "_model_figures": figures,
                "_history": history, "plan": target,
                "_left_float": [n for n in self._left_float
                                if n not in changed or target[n].dtype == "float" or n in still_float],
            }
            staged = copy.copy(self)  # the session as it will be, to build its results from
            staged.__dict__.update(new)
            new["results"] = staged._build_results()
        except BaseException:
            for n, m in reconversion.swapped.items():
                swap_module(quantized, n, m)
            raise
        self.__dict__.update(new)  # the commit: one step, nothing after it can fail

    def _calibration(self) -> Calibration:
        """What the flow needs to re-convert without calibrating again (the session's own dicts)."""
        return Calibration(
            model=self._model, reference=self._reference, quantized=self._quantized, plan=self.plan,
            run_plan=self._run_plan, records=self._records, initial=self._initial, calib=self._calib,
            example=self._example, backend=self.backend,
            run_batch=lambda model, batch, i: run_batch(model, batch, "calib_data", i, self._calib[0]),
        )

    def choices(self, layer: str, field: str, values) -> tuple:
        """Those of ``values`` for ``layer``'s ``field`` that apply() would accept now, checked
        as apply() checks a plan, without converting: the editor offers only these."""
        modules = {layer: self._reference.get_submodule(layer)}
        accepted = []
        for value in values:
            try:
                self.flow.check_plan(self.plan.with_changes({layer: {field: value}}), modules)
            except QvizError:
                continue
            accepted.append(value)
        return tuple(accepted)

    def _output_record(self, layer: str) -> PointRecord | None:
        """The layer's static output record (a rebuild needs its scale); None for a dynamic layer."""
        record = output_record(self._records, layer)
        return record if record is not None and record.role == "output" else None

    def search(self, *, target_sqnr: float | None = None, eval_fn=None, max_drop: float | None = None,
               ladder=None, callback=None):
        """A mixed-precision plan meeting the target at the least weight size (see
        :mod:`qviz.analysis.search`); the session is left on its current plan.
        ``callback(tried, most)`` follows the candidates (a progress bar); ``ladder`` defaults to
        the flow's dtypes from cheap to precise (int4, int8, float; PT2E: int8, float)."""
        if not self.can_apply:
            raise ConfigError(self._why_no_apply())
        history, sweep = list(self._history), self.results.sensitivity
        ladder = ladder or self.flow.ladder
        try:
            return search(self, target_sqnr=target_sqnr, eval_fn=eval_fn, max_drop=max_drop, ladder=ladder,
                          callback=callback)
        finally:  # back on the starting plan: its undo history and its sweep still hold
            self._history, self.results.sensitivity = history, sweep

    def param_counts(self) -> dict[str, int]:
        """Number of weight values of each layer (BN folded into its conv)."""
        return {n: sum(p.numel() for p in self._reference.get_submodule(n).parameters()) for n in self._layers}

    def quantized_model(self) -> nn.Module:
        """The converted model under the plan in force (the session's own: do not modify it)."""
        return self._quantized

    def float_model(self) -> nn.Module:
        """The float reference, fused like the quantized model (the session's own)."""
        return self._reference

    def report(self, path) -> pathlib.Path:
        """Write the sensitivity report, one self-contained HTML file, to ``path`` (atomically);
        returns the path. See :mod:`qviz.report`."""
        from qviz.report import write_report

        return write_report(self, path)

    @classmethod
    def from_qat(cls, qat_model: nn.Module, recorder, calib_data: Iterable, **kwargs) -> Session:
        """A session on a QAT model converted as trained (a copy with observers frozen), with the
        ``qviz.watch`` recorder's timeline in ``results.timeline`` and an ``fq_vs_int8_sqnr`` column:
        the converted model vs the fake-quantized one, layer by layer, on the same eval batches.
        ``recorder`` may also be a Timeline or None; ``kwargs`` go to ``Session``."""
        from qviz.capture.qat import fake_quant_vs_int8, frozen_qat_copy, timeline_of

        timeline = timeline_of(recorder)
        qat, flow = frozen_qat_copy(qat_model)
        session = cls(qat, calib_data, **{"flow": flow, **kwargs}).run()
        table = session.results.table
        with quiet_torch(), quantized_engine(session.backend):
            sqnr = fake_quant_vs_int8(qat, session._quantized, session.flow.quant_points(qat),
                                      list(table.index[table.quantized]), session._eval)
        table["fq_vs_int8_sqnr"] = [sqnr.get(n, np.nan) for n in table.index]
        session.results.timeline = timeline
        return session

    def sensitivity(self, *, eval_fn=None, executor=None, progress=None, callback=None,
                    variants=VARIANTS) -> Sensitivity:
        """What quantizing each layer alone costs, most sensitive first (see
        :mod:`qviz.analysis.sensitivity`): no calibration pass, and the plan and models stay as
        they are. Kept in ``results.sensitivity`` for save() and report(); ``eval_fn(model)``
        (higher is better) replaces the output SQNR; ``executor`` spreads layers over workers;
        ``callback(done, total)`` follows the layers (a progress bar); ``variants`` limits the
        figures measured (e.g. ``("quantize_only",)``, a quarter of the work). An ``eval_fn``
        failing on some layers raises :class:`qviz.SweepError` once the others are measured,
        their figures in its ``.partial``; layers whose figure is NaN rank last, with a warning."""
        results = self._results()
        if self._model is None:
            metric = None if eval_fn is None else getattr(eval_fn, "__name__", "eval_fn")
            stored = results.sensitivity
            if stored is None or metric not in (None, stored.attrs.get("metric")):
                raise QvizError(
                    "a session loaded from a file holds results only and cannot sweep: re-create it "
                    "from the model (qviz.Session(model, data, plan=...).run()) to run sensitivity()"
                )
            return Sensitivity.from_frame(stored)
        table = results.table
        progress = self.progress if progress is None else progress
        if self.flow.sensitivity_by == "re-conversion":
            found = self._reconversion_sweep(table, eval_fn, progress, callback, variants)
        else:
            found = sweep(self._reference, self._quantized, self._eval, list(table.index),
                          float_layers=list(table.index[~table["quantized"].astype(bool)]),
                          backend=self.backend, eval_fn=eval_fn, executor=executor,
                          progress=progress, cache_bytes=self.cache_bytes, callback=callback, variants=variants,
                          output_fn=self.output_fn)
        results.sensitivity = found.to_dataframe()
        return found

    def _reconversion_sweep(self, table, eval_fn, progress, callback, variants) -> Sensitivity:
        """Sensitivity for a flow that re-converts the whole model per variant (see
        :func:`qviz.analysis.sensitivity.reconversion_sweep`)."""
        calibration = self._calibration()

        def measure(model) -> float:
            return float(eval_fn(model)) if eval_fn is not None else self._comparator.compare(model, [])[1]["output_sqnr"]

        return reconversion_sweep(
            self.plan, table, lambda target: self.flow.reconvert(target, list(target), calibration).quantized, measure,
            float_metric=math.inf if eval_fn is None else float(eval_fn(self._reference)),
            current=self.summary()["output_sqnr"] if eval_fn is None else float(eval_fn(self._quantized)),
            metric=DEFAULT_METRIC if eval_fn is None else getattr(eval_fn, "__name__", "eval_fn"),
            by_sqnr=eval_fn is None, progress=progress, callback=callback, variants=variants)

    def diagnose(self, thresholds: Thresholds | None = None) -> pd.DataFrame:
        """Findings per layer with evidence and a fix (see :mod:`qviz.analysis.diagnosis`),
        focused on the sensitive layers once sensitivity() has run, naming outlier channels once
        outliers() has run."""
        results = self._results()
        stats = getattr(self, "_outlier_stats", None)
        outliers = None if stats is None else outlier_frame(stats, top=2**31)
        return diagnose(results, results.sensitivity, thresholds, outliers)

    def undo(self) -> Session:
        """Go back to the plan in force before the last apply()."""
        if not self._history:
            raise QvizError("nothing to undo: no plan was applied in this session")
        if not self.can_apply:
            raise ConfigError(self._why_no_apply())
        target, history = self._history[-1], self._history[:-1]
        if not self.plan.diff(target):
            self._history = history
            return self
        with quiet_torch(), quantized_engine(self.backend):  # the history changes with the plan, or not at all
            self._apply_plan(target, history)
        return self

    def _warn_nonfinite(self) -> None:
        """One warning naming the layers with NaN/Inf float weights and the evaluation batches
        with NaN/Inf inputs: figures measured through them (SQNR NaN) say nothing about
        quantization. Top-1 agreement leaves out the samples whose outputs are not finite."""
        layers = [n for n, w in self._weights.items()  # a NaN/Inf weight makes weight_sqnr NaN: look there only
                  if "float_weight" in w and math.isnan(w["weight_sqnr"]) and not bool(torch.isfinite(w["float_weight"]).all())]
        batches = [i for i, args in enumerate(self._eval) if any(
            isinstance(a, torch.Tensor) and a.is_floating_point() and not bool(torch.isfinite(a).all()) for a in args)]
        found = ([f"the float weights of {', '.join(layers)}"] if layers else []) + (
            [f"eval_data batch(es) {', '.join(map(str, batches))}"] if batches else [])
        if found:
            warnings.warn(
                f"NaN/Inf values in {' and in '.join(found)}: output SQNR and errors measured through "
                "them are NaN, and top1_agreement counts only samples with finite outputs. Fix the "
                "model's weights or the data (the nonfinite column counts NaN/Inf seen at calibration)",
                stacklevel=3,
            )

    @staticmethod
    def _warn_left_float(left_float: list[str]) -> None:
        if left_float:
            warnings.warn(
                f"{len(left_float)} layer(s) with weights stayed float because the backend "
                f"could not quantize them or their qconfig is None: {', '.join(left_float)} "
                "(rows with dtype 'float' in to_dataframe())",
                stacklevel=3,
            )

    # -- results -------------------------------------------------------------------------------
    def _results(self) -> Results:
        if self.results is None:
            raise QvizError("this session has not run yet: call session.run() first")
        return self.results

    def to_dataframe(self) -> pd.DataFrame:
        """One row per layer (quantized, or left float), in execution order."""
        return self._results().table.copy()

    def summary(self) -> dict:
        """Model-level figures: output_sqnr, top1_agreement, size_bytes, float_size_bytes, ..."""
        return dict(self._results().summary)

    def points(self) -> pd.DataFrame:
        """One row per quantization point (observer, fake-quant, converted weight)."""
        return self._results().points_frame()

    def record(self, point: str) -> PointRecord:
        """The full record of one quantization point (stats with histogram, qparams arrays)."""
        return self._results().record(point)

    def show(self, compare_with: Session | None = None):
        """The dashboard, inline in a notebook (see :mod:`qviz.ui`); ``compare_with`` adds a
        Compare tab with another session beside this one (e.g. PTQ vs QAT)."""
        from qviz.ui.widget import show

        return show(self, compare_with=compare_with)

    def widget(self):
        """The dashboard as an ipywidgets widget (VS Code, Voila, ipywidgets layouts)."""
        from qviz.ui.widget import widget

        return widget(self)

    def save(self, path) -> None:
        """Write everything the frame, summary and histograms need to ``path`` (atomically), and
        the activation outliers' statistics once :meth:`outliers` has measured them."""
        save_results(dataclasses.replace(self._results(), outliers=getattr(self, "_outlier_stats", None)), path)

    def outliers(self, top: int = 8) -> pd.DataFrame:
        """The activation outliers of every linear layer's input over the calibration batches:
        one row per (layer, channel) among each layer's ``top`` channels by abs-max, most extreme
        (``ratio_to_median``) first, with ``persistence``, ``kurtosis`` and ``kind`` (systematic,
        frequent or spike; see :mod:`qviz.analysis.outliers`). One float pass, computed once;
        kept by :meth:`save`, so a loaded session whose file has them gives the same frame."""
        if getattr(self, "_outlier_stats", None) is None and self._model is None:
            raise QvizError("this session file holds no activation-outlier statistics and no model to measure "
                            "them: call outliers() on the live session before save(), or re-create it from "
                            "the model")
        if getattr(self, "_outlier_stats", None) is None:
            with quiet_torch():
                self._outlier_stats = collect_outliers(
                    self._model, self._calib, lambda model, batch: run_batch(model, batch, "calib_data", 0, batch))
        return outlier_frame(self._outlier_stats, top)

    def weight_groups(self, layer: str, group_size: int | None = None) -> pd.DataFrame:
        """Linear ``layer``'s int4 weight groups: one row per (output channel, group) with its
        scale, zero point, SQNR (dB) and relative error (see :mod:`qviz.analysis.groups`).
        torchao's own figures where the torchao flow made the layer int4 at ``group_size``
        (None: the layer's); otherwise the what-if of torchao's int4 at ``group_size`` (None: the
        layer's, else 32), computed from the float weight. ``attrs`` say which (``source``)."""
        if self._model is None:
            raise QvizError("a session loaded from a file holds no weights: re-create it from the model to "
                            "see its weight groups")
        table = self._results().table
        if layer not in table.index:
            raise ConfigError(f"unknown layer {layer!r}: weight_groups() takes a row of to_dataframe(), "
                              f"e.g. {table.index[0]!r}")
        try:
            float_layer = self._model.get_submodule(layer)
        except AttributeError:
            raise ConfigError(f"{layer!r} is no module of the model (a functional op): weight groups are for "
                              "nn.Linear modules") from None
        config = self.plan.get(layer) if self.plan is not None else None
        own = config.group_size if config is not None else None
        holds_groups, flow_size = self.flow.int4_groups(config, float_layer)  # the flow's own int4 groups
        return layer_groups(layer, float_layer, self._quantized.get_submodule(layer) if holds_groups else None,
                            group_size, flow_size or own or DEFAULT_GROUP_SIZE,
                            config.weight_symmetric if config is not None else True)
    def algorithms(self, layers=None, methods=METHODS, dtype: str = "int4", group_size: int | None = 32,
                   alpha: float = 0.5, model_sqnr: bool = True) -> pd.DataFrame:
        """RTN vs SmoothQuant (migration strength ``alpha``) vs AWQ vs GPTQ vs HQQ on each of
        ``layers`` (a name or names; every linear layer by default), weights ``dtype`` ("int4" per
        group of ``group_size``, or "int8" per channel): one row per (layer, algorithm) with the
        layer's output ``sqnr`` over the calibration batches, ``gain_vs_rtn_db``, ``model_sqnr``
        (only that layer changed, on the eval batches: one forward of them per row;
        ``model_sqnr=False`` skips it) and ``did_nothing`` (see :mod:`qviz.analysis.algorithms`).
        One float pass over the calibration batches; the float model is not modified."""
        if self._model is None:
            raise QvizError("a session loaded from a file holds no model: re-create it from the model to "
                            "compare quantization algorithms")

        def run(model, batch):
            return run_batch(model, batch, "calib_data", 0, batch)

        def output(model, batch):
            return model_output(run_batch(model, batch, self._eval_name, 0, batch), self.output_fn)

        with quiet_torch():
            return compare_algorithms(self._model, self._calib, run, layers=layers, methods=methods, dtype=dtype,
                                      group_size=group_size, alpha=alpha, output=output,
                                      eval_batches=self._eval if model_sqnr else None)

    def to_model_explorer(self, path, figure: str = "output_sqnr", exported_program=None):
        """Write ``figure`` per layer as a Model Explorer node data file (see
        :mod:`qviz.io.model_explorer`); returns the ExportedProgram whose node ids it uses, to
        give ``model_explorer.visualize_pytorch(name, exported_program=..., node_data=...)``.
        ``exported_program``: your own export of the float model (a loaded session needs one)."""
        from qviz.io.model_explorer import export_float, node_data, write_node_data

        table = self._results().table
        if exported_program is None:
            if self._model is None:
                raise QvizError("a session loaded from a file holds no model to export: pass "
                                "exported_program=torch.export.export(model, example_inputs)")
            with TRACE_LOCK.tracing():
                exported_program = export_float(self._model, self._example)
        write_node_data(path, node_data(exported_program, table, figure))
        return exported_program

    @classmethod
    def from_results(cls, results: Results) -> Session:
        """A session holding saved results only: frames and histograms, no model."""
        session = cls.__new__(cls)
        session.flow, session.backend = None, results.meta.get("backend")
        session._model = session._calib = session._eval = session._example = None
        session.output_fn, session._eval_name = None, "eval_data"
        session.plan, session.progress, session.results = None, False, results
        session.source = None
        session._history = []
        session._outlier_stats = results.outliers
        return session


def _output_record_for(record: PointRecord, module: nn.Module, config) -> PointRecord:
    """A copy of a layer's output record with the qparams and observer of its rebuilt module."""
    observer = percentile_name(config) if config.activation == "percentile" else config.activation
    return dataclasses.replace(
        record,
        arrays=dict(record.arrays, scale=np.array([float(module.scale)]),
                    zero_point=np.array([float(module.zero_point)])),
        info=dict(record.info, observer=observer, quant_min=0,
                  quant_max=15 if config.dtype == "int4" else (127 if config.reduce_range else 255)),
    )


def percentile_name(config) -> str:
    return f"percentile({config.percentile:g})"


def load(path, *, max_bytes: int | None = None) -> Session:
    """Open a session file written by :meth:`Session.save` (safe with files from strangers: the
    file may make qviz allocate at most ``max_bytes``, 512 MiB by default; raise it for a larger
    file you trust). ``session.source`` is then ``path``: views name the session by its file."""
    session = Session.from_results(load_results(path, max_bytes=max_bytes))
    session.source = pathlib.Path(path)
    return session

