"""Hostile text for the UI tests: a model whose module names are HTML that runs script when
rendered unescaped, and a session file whose manifest carries such text in its flow, backend,
types, dtypes and observers (what a stranger's ``.qviz`` file can hold)."""

from __future__ import annotations

import torch
from torch import nn

import qviz

#: Module names, each running ``alert(N)`` if the browser ever renders it as HTML.
NAMES = ["<script>alert(1)</script>", "<img src=x onerror=alert(2)>", "<details open ontoggle=alert(3)>"]
#: The compared session's names: the first only in B, the second in both.
NAMES_B = ["<img src=x onerror=alert(4)>", NAMES[0]]
#: What the hostile file says where a real one names its flow, backend, types, ...
FILE_TEXT = {
    "flow": "<img src=x onerror=alert(11)>",
    "backend": "<details open ontoggle=alert(12)>",
    "type": "<img src=x onerror=alert(13)>",
    "observer": "<script>alert(14)</script>",
    "qscheme": "**not bold** [link](javascript:alert(15))",
}


class Hostile(nn.Module):
    """Linear(16, 16) + ReLU per name, the modules named ``names``."""

    def __init__(self, names=NAMES):
        super().__init__()
        for name in names:
            self.add_module(name, nn.Linear(16, 16))

    def forward(self, x):
        for module in self.children():
            x = torch.relu(module(x))
        return x


def hostile_session(names=NAMES):
    """A live FX session (it can apply) of :class:`Hostile` on two random batches."""
    torch.manual_seed(0)
    batches = [torch.randn(8, 16) for _ in range(2)]
    return qviz.Session(Hostile(names).eval(), batches, flow="fx", progress=False).run()


def hostile_file(path):
    """Write a session file of :func:`hostile_session` whose meta and table carry ``FILE_TEXT``."""
    session = hostile_session()
    results = session.results
    results.meta = {**results.meta, "flow": FILE_TEXT["flow"], "backend": FILE_TEXT["backend"]}
    for column in ("type", "observer", "qscheme"):
        results.table[column] = FILE_TEXT[column]
    session.save(path)
    return path
