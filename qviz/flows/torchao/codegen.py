"""The torchao flow's plan code: plain torch + torchao (no qviz) applying a plan with ``quantize_``.

Each layer's torchao config is written as the flow builds it (:meth:`TorchaoFlow.config_for`), an
``FqnToConfig`` by module name; torchao's number formats write their own configs
(:func:`qviz.flows.torchao.formats.code`), noting the ones qviz simulated on CPU.
"""

from __future__ import annotations

import json

from qviz.flows.torchao import formats
from qviz.options import FORMAT_DTYPES
from qviz.plan import LayerConfig, Plan


def torchao_code(plan: Plan, scheme: str, dynamic: bool, group_size: int | None) -> str:
    """Runnable Python (torch + torchao, no qviz) applying ``plan`` with ``quantize_`` under the
    session's ``scheme`` (``dynamic``: its activations are quantized at run time) and group size."""
    names = {"FqnToConfig", "quantize_"}
    mx_names: set[str] = set()  # from torchao.prototype.mx_formats

    def expr(config: LayerConfig) -> str:
        if config.dtype in FORMAT_DTYPES:
            text, imports = formats.code(config, dynamic)
            names.update(imports.get("torchao.quantization", ()))
            mx_names.update(imports.get("torchao.prototype.mx_formats", ()))
            return text
        if config.dtype == "int8":
            weight = "PerRow()" if config.weight == "per_channel" else "PerTensor()"
            names.add(weight[:-2])
            if dynamic:
                names.update(("Int8DynamicActivationInt8WeightConfig", "PerRow"))
                return f"Int8DynamicActivationInt8WeightConfig(granularity=[PerRow(), {weight}])"
            names.add("Int8WeightOnlyConfig")
            return f"Int8WeightOnlyConfig(granularity={weight})"
        size = config.group_size or group_size  # the layer's, else the session's
        granularity = f"PerGroup({size})" if size else "PerAxis(0)"
        names.update(("MappingType", granularity.split("(")[0]))
        mapping = "MappingType." + ("SYMMETRIC" if config.weight_symmetric else "ASYMMETRIC")
        if dynamic:
            names.add("Int8DynamicActivationIntxWeightConfig")
            return (
                f"Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, "
                f"weight_granularity={granularity}, weight_mapping_type={mapping})"
            )
        names.add("IntxWeightOnlyConfig")
        return f"IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity={granularity}, mapping_type={mapping})"

    lines = []
    for name, config in plan.items():
        if config.dtype in ("int8", "int4", *FORMAT_DTYPES):
            simulated = formats.simulated(config.dtype, dynamic)  # its kernels need a GPU
            note = f"  # needs {formats.needs(config)}; qviz simulated it on CPU" if simulated else ""
            lines.append(f"    {_literal(name)}: {expr(config)},{note}")
        else:
            lines.append(f"    {_literal(name)}: None,  # {config.describe()}")
    return "\n".join(
        [
            f'"""Quantization plan exported by qviz: torchao quantize_, scheme "{scheme}", {len(plan)} layers.',
            "",
            "Plain torch + torchao code: qviz is not needed to run it.",
            '"""',
            "",
            "import torch",
            "from torchao.quantization import (",
            *(f"    {n}," for n in sorted(names, key=str.lower)),
            ")",
            *(["from torchao.prototype.mx_formats import ("] if mx_names else []),
            *(f"    {n}," for n in sorted(mx_names, key=str.lower)),
            *([")"] if mx_names else []),
            "",
            "# Usage: quantize_(model.eval(), build_config(), filter_fn=None)",
            "",
            "FQN_TO_CONFIG = {",
            *lines,
            "}",
            "",
            "",
            "def build_config():",
            '    """The plan as an FqnToConfig for quantize_ (layers mapped to None stay float)."""',
            "    return FqnToConfig({k: v for k, v in FQN_TO_CONFIG.items() if v is not None})",
            "",
        ]
    )


def _literal(text: str) -> str:
    return json.dumps(text)
