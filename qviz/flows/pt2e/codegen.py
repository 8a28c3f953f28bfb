"""The PT2E flow's plan code: plain torch + torchao (no qviz) building the X86InductorQuantizer
of a plan, which ``prepare_pt2e`` takes.

X86InductorQuantizer configures modules by name with its default static config, ``reduce_range``
or None (left float): the code sets the default globally and names each layer where the plan differs.
"""

from __future__ import annotations

import json

from qviz.plan import Plan


def pt2e_code(plan: Plan) -> str:
    """Runnable Python (torch + torchao, no qviz) building the X86InductorQuantizer of ``plan``:
    the default config globally, module-name configs only where the plan differs from it."""
    lines = []
    for name, config in plan.items():
        if config.dtype == "float":
            lines.append(f"    quantizer.set_module_name_qconfig({json.dumps(name)}, None)  # left float")
        elif config.reduce_range:
            lines.append(f"    quantizer.set_module_name_qconfig({json.dumps(name)}, "
                         "get_default_x86_inductor_quantization_config(reduce_range=True))")
    return "\n".join([
        f'"""Quantization plan exported by qviz: PT2E with X86InductorQuantizer, {len(plan)} layers.',
        "",
        "Plain torch + torchao code: qviz is not needed to run it.",
        '"""',
        "",
        "from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (",
        "    X86InductorQuantizer,",
        "    get_default_x86_inductor_quantization_config,",
        ")",
        "",
        "# Usage: exported = torch.export.export(model.eval(), example_inputs,",
        "#                                       dynamic_shapes=({0: torch.export.Dim.AUTO},)).module()",
        "#        exported.graph.eliminate_dead_code(); exported.recompile()  # unused outputs out",
        "#        prepared = prepare_pt2e(exported, build_quantizer())",
        "#        ...calibrate prepared...; quantized = convert_pt2e(prepared)",
        "",
        "",
        "def build_quantizer():",
        '    """X86InductorQuantizer with the plan\'s per-module configs."""',
        "    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())",
        *lines,
        "    return quantizer",
        "",
    ])
