"""torchao ``quantize_``: per-layer configs by module name on a deep copy of the float model.

Each ``nn.Linear`` gets the torchao config its plan entry asks for (through ``FqnToConfig``):

- scheme "int8_dynamic": int8 layers ``Int8DynamicActivationInt8WeightConfig`` (int8 per-token
  activations computed at run time, int8 per-channel weights); int4 layers
  ``Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4)`` (int8 activations, int4
  grouped weights);
- "int8_weight_only" / "int4_weight_only": ``Int8WeightOnlyConfig`` for int8 layers and
  ``IntxWeightOnlyConfig(weight_dtype=torch.int4)`` for int4 layers; activations stay float.
  The scheme also sets the default dtype of every Linear layer.

int4 weights are grouped along the input dimension (``group_size``, None for one scale per
output channel; a layer's ``LayerConfig.group_size`` overrides it); torchao's
``Int4WeightOnlyConfig`` needs GPU kernels, so qviz uses the intx configs, which run on CPU
(weights stored as int8 holding 4-bit values). float8, MX and NVFP4 layers take torchao's
configs for them, simulated on CPU where those need a GPU (:mod:`qviz.flows.torchao.formats`). Convolutions,
norms and other layers stay float (torchao's configs are for Linear layers).
``quantize_`` keeps module names, so the usual per-module comparison applies; there are no
observers: qviz records each Linear's input during the calibration pass (role "dynamic").
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import logging
import math
import warnings

import torch
from torch import nn

from qviz.analysis.groups import dividing_sizes, group_size_fits
from qviz.errors import ConfigError, ModelError
from qviz.flows.base import Calibration, Flow, QuantPoint, check_backend, copy_sharing_parameters
from qviz.flows.torchao import formats
from qviz.flows.torchao.codegen import torchao_code
from qviz.options import FORMAT_DTYPES, option
from qviz.plan import LayerConfig, Plan

SCHEMES = {  # scheme -> (default dtype of Linear layers, activations)
    "int8_dynamic": ("int8", "dynamic"),
    "int8_weight_only": ("int8", "weight_only"),
    "int4_weight_only": ("int4", "weight_only"),
}
INSTALL = 'flow="torchao" needs torchao, which is not installed: pip install "qviz[torchao]"'
_NOISY_LOGGERS = ("torchao", "torch.utils._pytree")


@contextlib.contextmanager
def quiet_torchao():
    """Hide torchao's harmless CPU noise ("Failed to load ..._C_mxfp8" log lines, warnings)."""
    loggers = [logging.getLogger(n) for n in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def load_torchao():
    """``torchao.quantization``, imported quietly; a ConfigError saying what to install if absent."""
    try:
        with quiet_torchao():
            importlib.import_module("torchao")
            importlib.import_module("torchao.quantization.qat")  # its import logs too
            return importlib.import_module("torchao.quantization")
    except ImportError as exc:
        raise ConfigError(f"{INSTALL} ({exc})") from None


def is_torchao_fake_quantizer(module: nn.Module) -> bool:
    """torchao QAT fake quantizers (IntxFakeQuantizer...): scale/zero_point are plain attributes."""
    return all(
        hasattr(module, a) for a in ("config", "enabled", "scale", "zero_point")
    ) and not hasattr(module, "calculate_qparams")


def fake_quantizer_range(module: nn.Module) -> tuple[int, int] | None:
    """(quant_min, quant_max) of a torchao fake quantizer's integer dtype, None if not integer."""
    dtype = getattr(getattr(module, "config", None), "dtype", None)
    name = str(dtype).replace("torch.", "")
    for prefix, signed in (("int", True), ("uint", False)):
        bits = name[len(prefix) :]
        if name.startswith(prefix) and bits.isdigit():
            n = int(bits)
            return (-(2 ** (n - 1)), 2 ** (n - 1) - 1) if signed else (0, 2**n - 1)
    return None


def _check_scheme(scheme, group_size) -> None:
    if scheme not in SCHEMES:
        raise ConfigError(
            f"torchao scheme {scheme!r} is not valid; choose one of {', '.join(map(repr, SCHEMES))}"
        )
    if group_size is not None and (
        isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 0
    ):
        raise ConfigError(
            f"group_size must be a positive int (e.g. 32, 64, 128), or None for one scale per output "
            f"channel, not {group_size!r}"
        )


class TorchaoFlow(Flow):
    """``quantize_`` with per-layer torchao configs; no calibration (weight-only or dynamic)."""

    name = "torchao"
    summary = "torchao's quantize_"
    quantizes = "nn.Linear"
    session_options = {"scheme": "scheme", "group_size": "group_size"}
    needs_calibration = False
    # plan fields it honours (see check_plan): no observers, nothing to calibrate
    editable = {"dtype": ("int8", "int4", *FORMAT_DTYPES, "float"), "weight": option("weight").choices,
                "group_size": (None, *option("group_size").suggested)}  # None: the flow's group_size

    def __init__(
        self, backend: str = "x86", scheme: str | None = "int8_dynamic", group_size: int | None = 32
    ):
        """``group_size`` None: one int4 scale per output channel; ``scheme`` None: int8_dynamic."""
        self.backend = check_backend(backend)
        scheme = "int8_dynamic" if scheme is None else scheme
        _check_scheme(scheme, group_size)
        self.scheme = scheme
        self.group_size = group_size or None
        self.dtype, self.activations = SCHEMES[scheme]
        self.ao = load_torchao()
        self.plan: Plan | None = None

    @property
    def meta(self) -> dict:
        """What :meth:`plan_code` needs besides the plan."""
        return {"scheme": self.scheme, "group_size": self.group_size}

    # -- the protocol ------------------------------------------------------------------------
    def prepare(self, model: nn.Module, example_inputs: tuple) -> nn.Module:
        """A copy of the model; the group size is checked against its int4 layers first (before
        calibration), so torchao's AssertionError on a size that does not divide never shows."""
        linears = {n: m for n, m in model.named_modules() if n and isinstance(m, nn.Linear)}
        plan = self.plan or Plan(self.backend, {n: LayerConfig(dtype=self.dtype) for n in linears})
        self.check_plan(plan, linears)
        return copy.deepcopy(model).eval()

    def quant_points(self, observed: nn.Module) -> list[QuantPoint]:
        return [
            QuantPoint(n, m, n, "dynamic")
            for n, m in observed.named_modules()
            if isinstance(m, nn.Linear)
        ]

    def reference(self, observed: nn.Module, points: list[QuantPoint]) -> nn.Module:
        return observed

    def find_layers(self, quantized: nn.Module, reference: nn.Module) -> tuple[list[str], list[str]]:
        """As :func:`qviz.flows.layers.find_layers`, but only layers with a matrix or kernel
        weight (Linear, conv, embedding) count as left float: norms were never candidates."""
        layers, left_float = super().find_layers(quantized, reference)
        weight = lambda n: getattr(quantized.get_submodule(n), "weight", None)  # noqa: E731
        return layers, [
            n for n in left_float if isinstance(weight(n), torch.Tensor) and weight(n).dim() >= 2
        ]

    def convert(self, observed: nn.Module) -> nn.Module:
        """``quantize_`` on a copy of ``observed`` sharing its parameters: torchao gives each
        quantized Linear a new weight object, the other tensors are held once."""
        quantized = copy_sharing_parameters(observed).eval()
        linears = {n: m for n, m in quantized.named_modules() if n and isinstance(m, nn.Linear)}
        if self.plan is not None:
            self.check_plan(self.plan, linears)
        configs = {n: self.config_for(self._layer_config(n)) for n in linears}
        configs = {n: c for n, c in configs.items() if c is not None}
        for n in [n for n in configs if self._simulates(self._layer_config(n))]:  # formats needing a GPU
            config = self._layer_config(n)
            quantized.set_submodule(n, formats.SimulatedLinear(linears[n], configs.pop(n), config))
        if configs:
            self._quantize(quantized, self.ao.FqnToConfig(configs), None, type(observed).__name__)
        return quantized

    def _quantize(self, module: nn.Module, config, filter_fn, what: str) -> None:
        """torchao's ``quantize_``; a failure inside torchao becomes a ModelError saying what to do."""
        try:
            with quiet_torchao():
                self.ao.quantize_(module, config, filter_fn=filter_fn)
        except Exception as exc:  # noqa: BLE001 - torchao's checks raise AssertionError, ValueError, ...
            hint = ("convert the model to float32 or bfloat16 first (model.float())"
                    if "dtype" in str(exc) else "leave the layers it fails on 'float' in the plan")
            raise ModelError(
                f"torchao's quantize_ could not quantize {what} ({type(exc).__name__}: {exc}); plain "
                f"torchao fails the same way: {hint}, or use another scheme="
            ) from exc

    # -- plans -------------------------------------------------------------------------------
    def default_plan(self, model: nn.Module, layers: list[str], left_float: list[str]) -> Plan:
        """Linear layers at the scheme's dtype, everything else float."""
        return Plan(
            self.backend,
            {n: LayerConfig(dtype="float" if n in left_float else self.dtype) for n in layers},
        )

    def _layer_config(self, name: str) -> LayerConfig:
        if self.plan is not None and name in self.plan:
            return self.plan[name]
        return LayerConfig(dtype=self.dtype)

    def check_plan(self, plan: Plan, modules: dict[str, nn.Module]) -> None:
        """Refuse what the torchao configs cannot do, naming every layer and the fix."""
        problems, ungrouped = [], {}
        for name, module in modules.items():
            config = plan.get(name)
            if config is None or config.dtype == "float":
                continue
            if config.dtype == "fp16":
                problems.append(
                    f"{name!r}: dtype 'fp16' is not a torchao scheme in qviz; use 'int8', 'int4' or 'float'"
                )
            elif not isinstance(module, nn.Linear):
                problems.append(
                    f"{name!r} is {type(module).__name__}: torchao's configs quantize Linear layers only; "
                    "keep it 'float'"
                )
            elif config.dtype in FORMAT_DTYPES:
                problem = formats.problem(name, module, config, self.activations == "dynamic")
                problems += [problem] if problem else []
            elif config.dtype == "int8" and not config.weight_symmetric:
                problems.append(
                    f"{name!r}: torchao's int8 weights are symmetric; set weight_symmetric=True"
                )
            elif config.dtype == "int4" and config.weight == "per_tensor":
                problems.append(
                    f"{name!r}: int4 weights are per group or per channel; set weight='per_channel'"
                )
            elif config.dtype == "int4" and config.group_size is not None:
                if not group_size_fits(config.group_size, module.in_features):
                    problems.append(f"{name!r}: group_size {config.group_size} does not divide its in_features "
                                    f"({module.in_features}); use one of "
                                    f"{', '.join(map(str, dividing_sizes(module.in_features)))} or None")
            elif (
                config.dtype == "int4" and self.group_size and module.in_features % self.group_size
            ):
                ungrouped[name] = module.in_features
        if ungrouped:
            problems.append(_group_size_problem(self.group_size, ungrouped, modules, plan))
        if problems:
            raise ConfigError("the torchao flow cannot run this plan:\n" + "\n".join(problems))

    def config_for(self, config: LayerConfig):
        """The torchao config for one layer's LayerConfig (None: leave it float)."""
        ao = self.ao
        if config.dtype == "float":
            return None
        dynamic = self.activations == "dynamic"
        if config.dtype in FORMAT_DTYPES:
            return formats.torchao_config(ao, config, dynamic)
        if config.dtype == "int8":
            weight = ao.PerRow() if config.weight == "per_channel" else ao.PerTensor()
            if dynamic:
                return ao.Int8DynamicActivationInt8WeightConfig(
                    granularity=[ao.PerRow(), weight], set_inductor_config=False
                )
            return ao.Int8WeightOnlyConfig(granularity=weight, set_inductor_config=False)
        group_size = config.group_size or self.group_size  # the layer's, else the flow's
        granularity = ao.PerGroup(group_size) if group_size else ao.PerAxis(0)
        mapping = ao.MappingType.SYMMETRIC if config.weight_symmetric else ao.MappingType.ASYMMETRIC
        if dynamic:
            return ao.Int8DynamicActivationIntxWeightConfig(
                weight_dtype=torch.int4, weight_granularity=granularity, weight_mapping_type=mapping
            )
        return ao.IntxWeightOnlyConfig(
            weight_dtype=torch.int4, granularity=granularity, mapping_type=mapping
        )

    def _simulates(self, config: LayerConfig) -> bool:
        """True when ``config`` is a number format whose torchao kernels need a GPU (qviz simulates it)."""
        return formats.simulated(config.dtype, self.activations == "dynamic")

    def int4_groups(self, config: LayerConfig | None, float_layer: nn.Module) -> tuple[bool, int | None]:
        """int4 here is the layer's group size, else the flow's, else one group per row."""
        size = (config.group_size if config is not None else None) or self.group_size
        return config is not None and config.dtype == "int4", size or getattr(float_layer, "in_features", None)

    def rebuild_layer(self, name: str, config: LayerConfig, calibration: Calibration) -> nn.Module:
        """One layer under ``config``, from its float twin (a copy; float keeps the float module)."""
        layer = copy.deepcopy(calibration.reference.get_submodule(name))
        ao_config = self.config_for(config)
        if self._simulates(config):
            return formats.SimulatedLinear(layer, ao_config, config)
        if ao_config is not None:
            self._quantize(layer, ao_config, lambda module, fqn: module is layer, type(layer).__name__)
        return layer

    @classmethod
    def plan_code(cls, plan: Plan, scheme: str = "int8_dynamic", group_size: int | None = 32) -> str:
        """Plain torch + torchao code applying ``plan`` with ``quantize_``: an ``FqnToConfig`` of
        each layer's config under the session's ``scheme`` and ``group_size`` (its :attr:`meta`)."""
        _check_scheme(scheme, group_size)
        return torchao_code(plan, scheme, SCHEMES[scheme][1] == "dynamic", group_size)


def _group_size_problem(group_size: int, ungrouped: dict, modules: dict, plan: Plan) -> str:
    """Which int4 layers ``group_size`` does not divide, and the sizes that divide every int4 layer
    grouped by it (not those with a group_size of their own)."""
    widths = [m.in_features for n, m in modules.items() if isinstance(m, nn.Linear)
              and n in plan and plan[n].dtype == "int4" and plan[n].group_size is None]
    common = math.gcd(*widths)
    sizes = [d for d in (256, 128, 64, 32, 16, 8, 4, 2) if common % d == 0][:4]
    listed = ", ".join(f"{n!r} ({w})" for n, w in list(ungrouped.items())[:6])
    more = f" and {len(ungrouped) - 6} more" if len(ungrouped) > 6 else ""
    fits = (f"use a group_size dividing every int4 layer's in_features ({', '.join(map(str, sizes))}), "
            if sizes else "no group size from 2 to 256 divides them all: use ")
    return (
        f"group_size {group_size} does not divide the in_features of int4 layer(s) {listed}{more}; "
        f"{fits}group_size=None (one scale per output channel), or keep those layers int8"
    )
