"""s.to_model_explorer(): node data in the format the ai-edge-model-explorer package reads."""

from __future__ import annotations

import json

import pytest

import qviz
from qviz.errors import ConfigError, QvizError

me = pytest.importorskip("model_explorer", reason="ai-edge-model-explorer is in the test extra")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                                        "ignore::UserWarning")


@pytest.fixture(scope="module")
def session(demo_sessions):
    return demo_sessions(short=True)


def _adapter_graph(program):
    from model_explorer.pytorch_exported_program_adapter_impl import (
        PytorchExportedProgramAdapterImpl,
    )

    graphs = PytorchExportedProgramAdapterImpl(program, {"const_element_count_limit": 16}).convert()
    (graph,) = graphs["graphs"]
    return graph


def test_node_data_loads_in_model_explorer_and_names_its_nodes(session, tmp_path):
    import dacite
    from model_explorer.node_data_builder import ModelNodeData

    path = tmp_path / "sqnr.json"
    program = session.to_model_explorer(path)
    data = json.loads(path.read_text())
    # the package's own dataclasses take the file, strictly (no unknown or mistyped field)
    parsed = dacite.from_dict(ModelNodeData, {"graphsData": data}, config=dacite.Config(strict=True))
    graph = _adapter_graph(program)
    assert list(parsed.graphsData) == [graph.id]
    nodes = {n.id: n for n in graph.nodes}
    results = parsed.graphsData[graph.id].results
    assert set(results) <= set(nodes)
    table = session.to_dataframe()
    by_label = {}
    for node_id, result in results.items():
        by_label.setdefault(nodes[node_id].label, []).append(result.value)
    # every conv and linear of the demo carries its layer's output SQNR, nothing else is coloured
    assert sorted(v for label in ("aten.conv2d", "aten.linear") for v in by_label[label]) == sorted(
        table["output_sqnr"].astype(float))
    assert set(by_label) == {"aten.conv2d", "aten.linear"}
    conv = next(i for i, n in nodes.items() if n.label == "aten.conv2d" and n.namespace.endswith("_stem_conv"))
    assert results[conv].value == pytest.approx(table.loc["stem_conv", "output_sqnr"])


def test_other_figures_and_bad_input(session, tmp_path):
    session.to_model_explorer(tmp_path / "w.json", figure="weight_sqnr")
    values = [r["value"] for r in json.loads((tmp_path / "w.json").read_text())["graph"]["results"].values()]
    assert sorted(values) == sorted(session.to_dataframe()["weight_sqnr"].astype(float))
    with pytest.raises(ConfigError, match="output_sqnr"):
        session.to_model_explorer(tmp_path / "x.json", figure="no_such_figure")
    session.save(tmp_path / "s.qviz")
    with pytest.raises(QvizError, match="exported_program="):
        qviz.load(tmp_path / "s.qviz").to_model_explorer(tmp_path / "y.json")
