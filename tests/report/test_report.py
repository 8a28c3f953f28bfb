"""The HTML report: one self-contained file whose numbers are the session's own, that opens
offline in chromium with every figure drawn, prints without clipping, and whose CLI fails
with one line on bad files."""

from __future__ import annotations

import base64
import gzip
import math
import os
import re
import subprocess
import sys
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
from plotly.offline import get_plotlyjs

import qviz
from qviz.analysis.diagnosis import diagnose
from qviz.charts.layers import depth_figure
from qviz.charts.layout import AMBER_DB, RED_DB
from qviz.charts.sensitivity import sensitivity_figure
from qviz.cli import main
from qviz.demo import calibration_batches, load_demo_model
from qviz.report import build_report, write_report
from qviz.report.html import (
    SENSITIVITY_COLUMNS,
    format_number,
    frame_table,
    worst_layers,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]


class ParsedReport(HTMLParser):
    """The report's tables (by id: header texts, rows of (text, attrs) cells), every URL-bearing
    attribute, the script tags and the text of ``<pre id=...>`` blocks."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tables: dict[str, dict] = {}
        self.urls: list[tuple[str, str, str]] = []
        self.scripts: list[dict] = []
        self.pre: dict[str, str] = {}
        self._table = self._row = self._cell = self._pre = None
        self._thead = False
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for name in ("src", "href", "action", "data", "poster", "srcset"):
            if name in attrs:
                self.urls.append((tag, name, attrs[name] or ""))
        if tag == "script":
            self.scripts.append(attrs)
        elif tag == "table":
            self._table = self.tables.setdefault(attrs.get("id", f"table-{len(self.tables)}"),
                                                 {"head": [], "rows": []})
        elif tag == "thead":
            self._thead = True
        elif tag == "tr" and self._table is not None:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = ([], attrs)
        elif tag == "pre" and "id" in attrs:
            self._pre = attrs["id"]
            self.pre[self._pre] = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append(("".join(self._cell[0]).strip(), self._cell[1]))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            if self._thead:
                self._table["head"] = [text for text, _ in self._row]
            else:
                self._table["rows"].append(self._row)
            self._row = None
        elif tag == "thead":
            self._thead = False
        elif tag == "table":
            self._table = None
        elif tag == "pre":
            self._pre = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[0].append(data)
        if self._pre is not None:
            self.pre[self._pre] += data


def assert_table_equals(table: dict, frame: pd.DataFrame, index_name: str = "layer") -> None:
    """Header, row names and every value of an HTML table equal the frame's: numbers exactly
    (data-value) and as displayed (5 significant digits), other values as text."""
    assert table["head"] == [index_name, *map(str, frame.columns)]
    assert [row[0][0] for row in table["rows"]] == [str(i) for i in frame.index]
    for row, (name, values) in zip(table["rows"], frame.iterrows(), strict=True):
        assert len(row) == len(frame.columns) + 1
        for (text, attrs), column in zip(row[1:], frame.columns, strict=True):
            value = values[column]
            where = f"{name}.{column}"
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
                assert text == ("" if value is None else str(value)), where  # None: an empty cell
                assert "data-value" not in attrs, where
                continue
            exact = float(attrs["data-value"])
            if math.isnan(value):
                assert math.isnan(exact) and text == "–", where
            else:
                assert exact == float(value), where
                assert text == format_number(value), where
                assert math.isclose(float(text), float(value), rel_tol=1e-4), where


@pytest.fixture(scope="module")
def demo(demo_sessions, tmp_path_factory):
    """The demo session, its session file saved before any sweep, and the sweep's frame."""
    folder = tmp_path_factory.mktemp("report")
    session = demo_sessions()
    saved = folder / "demo.qviz"
    session.save(saved)
    sweep = session.sensitivity().to_dataframe()
    return session, saved, sweep, folder


@pytest.fixture(scope="module")
def report(demo):
    session, _, _, folder = demo
    path = session.report(folder / "report.html")
    text = path.read_text(encoding="utf-8")
    return path, text, ParsedReport(text)


def test_report_is_one_self_contained_file(demo, report):
    path, text, parsed = report
    assert path == demo[3] / "report.html" and text.startswith("<!DOCTYPE html>")
    packed = re.findall(r'<script id="qviz-plotly" type="application/octet-stream">([^<]*)</script>', text)
    assert len(packed) == 1, "plotly.js must be inlined exactly once"
    assert gzip.decompress(base64.b64decode(packed[0])).decode() == get_plotlyjs()
    plotly_js = packed[0]
    assert len(text.encode()) < 2.5 * 2**20, "plotly.js packed: the report of the demo stays small"
    assert [s for s in parsed.scripts if "src" in s] == [], "no script is loaded from elsewhere"
    external = [u for u in parsed.urls if re.match(r"\s*(https?:|//|ftp:)", u[2], re.I)]
    assert external == [], external
    assert all(u[2].startswith("#") for u in parsed.urls), parsed.urls
    outside_plotly = text.replace(plotly_js, "")
    assert "<link" not in outside_plotly and "@import" not in outside_plotly
    assert not re.search(r"url\(\s*['\"]?(https?:|//)", outside_plotly)
    for section in ("summary", "sensitivity", "depth", "histograms", "outliers", "diagnosis", "plan", "layers"):
        assert f'<section id="{section}">' in text
    assert not list(path.parent.glob(".report.html.*")), "the temporary file was left behind"


def test_ranking_bars_start_at_zero_and_are_noise_shares(demo):
    sweep = demo[2]
    fig = sensitivity_figure(sweep, metric="output_sqnr")
    (bar,) = fig.data
    assert bar.base is None  # plotly's default: every bar starts at 0
    ranked = sweep.sort_values("rank")
    expected = 100 * 10 ** (-ranked["quantize_only"].to_numpy(dtype=float) / 10)
    assert np.allclose(bar.x, expected)  # % of the output's power, which add up across layers
    assert list(bar.y) == [str(i) for i in ranked.index]
    assert all(a >= b for a, b in zip(bar.x, bar.x[1:], strict=False)), "the most sensitive layer has the longest bar"


def test_depth_chart_keeps_its_guide_lines_in_view(demo):
    table = demo[0].to_dataframe().copy()
    table[["local_sqnr", "output_sqnr"]] = 45.0  # every layer far above both lines
    lo, hi = depth_figure(table).layout.yaxis.range
    assert lo < RED_DB < AMBER_DB < hi


def test_layer_table_is_the_dataframe(demo, report):
    assert_table_equals(report[2].tables["layer-table"], demo[0].to_dataframe())


def test_sensitivity_table_is_the_sweep(demo, report):
    _, _, sweep, _ = demo
    assert set(SENSITIVITY_COLUMNS) <= set(sweep)
    columns = [c for c in SENSITIVITY_COLUMNS if c in sweep] + [c for c in sweep if c not in SENSITIVITY_COLUMNS]
    table = report[2].tables["sensitivity-table"]
    assert_table_equals(table, sweep[columns])
    assert [row[1][0] for row in table["rows"]] == [str(r) for r in range(1, len(sweep) + 1)]
    assert 'id="qviz-sensitivity"' in report[1]
    assert "no sensitivity sweep" not in report[1]


def test_summary_holds_the_model_figures(demo, report):
    session = demo[0]
    summary, meta = session.summary(), session.results.meta
    rows = {r[0][0]: r[1][0] for r in report[2].tables["summary-table"]["rows"]}
    assert rows["model output SQNR"] == f"{summary['output_sqnr']:.2f} dB"
    assert rows["top-1 agreement with float"] == f"{summary['top1_agreement']:.2%}"
    assert rows["size vs float"].startswith(
        f"{summary['size_bytes'] / 1024:.1f} KiB vs {summary['float_size_bytes'] / 1024:.1f} KiB float")
    assert (rows["flow"], rows["backend"], rows["torch"]) == ("fx", "x86", meta["torch"])


def test_histograms_of_the_worst_layers(demo, report):
    table, text = demo[0].to_dataframe(), report[1]
    expected = list(table["local_sqnr"].sort_values().index[:4])
    assert worst_layers(table) == expected
    shown = re.findall(r"<h3>\d\. (\S+) · local SQNR", text)
    assert shown == expected
    assert [f'id="qviz-hist-{i}"' in text for i in range(5)] == [True] * 4 + [False]
    # histogram_figure's named shapes: the range band, the clipped tails and the grid
    for name in ("representable range", "grid"):
        assert f'"name":"{name}"' in text
    assert 'id="qviz-depth"' in text


def test_plan_section_live_and_loaded(demo, report, tmp_path):
    session, saved, _, _ = demo
    assert report[2].pre["plan-code"] == session.plan.to_code(flow="fx")
    assert_table_equals(report[2].tables["plan-table"],
                        pd.DataFrame.from_dict({n: {**c.to_dict(), "description": c.describe()}
                                                for n, c in session.plan.items()}, orient="index"))
    loaded = qviz.load(saved)
    assert loaded.plan is None
    text = loaded.report(tmp_path / "loaded.html").read_text(encoding="utf-8")
    parsed = ParsedReport(text)
    assert "plan-code" not in parsed.pre and "no plan: session files keep results" in text
    assert_table_equals(parsed.tables["layer-table"], session.to_dataframe())
    assert loaded.results.sensitivity is None  # saved before the sweep
    assert "no sensitivity sweep in this session: run s.sensitivity()" in text


def test_missing_sweep_says_so(demo, monkeypatch):
    session = demo[0]
    monkeypatch.setattr(session.results, "sensitivity", None)
    text = build_report(session)
    assert "no sensitivity sweep in this session: run s.sensitivity()" in text
    assert 'id="sensitivity-table"' not in text


def test_diagnosis_table(demo, report):
    session, _, sweep, _ = demo
    expected = diagnose(session.results, sweep)
    assert not expected.empty  # the demo's sweep flags its sensitive layers
    text = report[1]
    table = ParsedReport(text).tables["diagnosis-table"]
    assert table["head"] == list(expected.columns)
    assert [[c for c, _ in row] for row in table["rows"]] == [[str(v) for v in r] for r in expected.itertuples(index=False)]


def test_text_is_escaped(demo):
    text = build_report(demo[0], title='<script>alert("x")</script> & co')
    assert '<script>alert("x")' not in text
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; co" in text
    frame = pd.DataFrame({"v": [1.5], "s": ["<b>&"]}, index=pd.Index(['a"<i>'], name="layer"))
    snippet = frame_table(frame, table_id="t")
    assert "<b>" not in snippet and "<i>" not in snippet and "&lt;b&gt;&amp;" in snippet
    assert ParsedReport(snippet).tables["t"]["rows"][0][0][0] == 'a"<i>'


def test_write_is_atomic_and_errors_are_qviz_errors(demo, tmp_path, monkeypatch):
    session = demo[0]
    target = tmp_path / "r.html"
    target.write_text("old")
    from qviz.io import atomic  # every qviz write goes through it

    def fail(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(atomic.os, "replace", fail)
    with pytest.raises(RuntimeError):
        write_report(session, target)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["r.html"]
    monkeypatch.undo()
    with pytest.raises(qviz.QvizError, match="does not exist"):
        write_report(session, tmp_path / "missing" / "r.html")
    with pytest.raises(qviz.QvizError, match="is a directory"):
        write_report(session, tmp_path)
    fresh = qviz.Session(load_demo_model(), calibration_batches(1, 4), progress=False)
    with pytest.raises(qviz.QvizError, match="has not run yet"):
        fresh.report(tmp_path / "r.html")


def test_cli_writes_the_report(demo, tmp_path, capsys):
    session, _, sweep, _ = demo
    saved = tmp_path / "swept.qviz"
    session.save(saved)  # after the sweep: the session file keeps it
    out = tmp_path / "cli.html"
    assert main(["report", str(saved), "-o", str(out)]) == 0
    assert "wrote the report" in capsys.readouterr().out
    parsed = ParsedReport(out.read_text(encoding="utf-8"))
    assert_table_equals(parsed.tables["layer-table"], session.to_dataframe())
    columns = [c for c in SENSITIVITY_COLUMNS if c in sweep] + [c for c in sweep if c not in SENSITIVITY_COLUMNS]
    assert_table_equals(parsed.tables["sensitivity-table"], sweep[columns])


def test_cli_reports_a_demo_run_with_its_sweep(demo, tmp_path, capsys):
    session, _, sweep, _ = demo
    out = tmp_path / "demo.html"
    assert main(["report", "--demo", "--sweep", "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert "running the sensitivity sweep" in captured.err and "wrote the report" in captured.out
    parsed = ParsedReport(out.read_text(encoding="utf-8"))
    assert_table_equals(parsed.tables["layer-table"], session.to_dataframe())  # the demo is deterministic
    columns = [c for c in SENSITIVITY_COLUMNS if c in sweep] + [c for c in sweep if c not in SENSITIVITY_COLUMNS]
    assert_table_equals(parsed.tables["sensitivity-table"], sweep[columns])


def test_cli_cannot_sweep_a_session_file_and_says_what_to_do(demo, tmp_path, capsys):
    out = tmp_path / "never.html"
    assert main(["report", str(demo[1]), "--sweep", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "holds results only" in err and "qviz demo --sweep --save" in err and not out.exists()
    assert main(["report", "-o", str(out)]) == 2
    assert "give a session file" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["truncated", "foreign"])
def test_cli_refuses_bad_files_with_one_line(demo, tmp_path, capsys, kind):
    bad = tmp_path / f"{kind}.qviz"
    data = demo[1].read_bytes()
    bad.write_bytes(data[: len(data) // 2] if kind == "truncated" else b"PK\x03\x04 not really a zip" * 10)
    out = tmp_path / "never.html"
    assert main(["report", str(bad), "-o", str(out)]) != 0
    captured = capsys.readouterr()
    assert captured.out == "" and not out.exists()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qviz: error: ") and str(bad) in lines[0], captured.err


def test_cli_entry_point_has_no_traceback(tmp_path):
    bad = tmp_path / "notes.qviz"
    bad.write_text("just some text, not a session")
    proc = subprocess.run([sys.executable, "-m", "qviz.cli", "report", str(bad), "-o", str(tmp_path / "o.html")],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("qviz: error: "), proc.stderr


@pytest.mark.browser
def test_report_renders_offline_in_chromium(report, new_page, artifacts):
    path, text, _ = report
    page, log = new_page(1400, 1000)
    page.route(re.compile(r"^(https?|wss?)://"), lambda route: route.abort())  # offline: nothing else loads
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(path.as_uri())
    page.wait_for_function("document.querySelectorAll('.js-plotly-plot .main-svg').length >= 8")
    figures = text.count('class="figure"')
    assert page.locator(".js-plotly-plot").count() == figures == 8  # sensitivity, depth, 4 histograms, outliers, groups
    bars = page.evaluate("document.querySelectorAll('.js-plotly-plot .trace.bars .point').length")
    assert bars > 50
    assert [u for u in requests if not u.startswith("file:")] == []
    assert log.errors == []
    # names and values are text a reader can select and copy
    cell = page.locator("#layer-table tbody tr").first.locator("td").nth(4)
    assert cell.evaluate("e => getComputedStyle(e).userSelect") != "none"
    page.screenshot(path=str(artifacts / "report.png"), full_page=True)

    # printed: nothing wider than the page, no box that cuts a figure or a table
    page.set_viewport_size({"width": 980, "height": 1000})
    page.emulate_media(media="print")
    clipped = page.evaluate("""() => {
        const bad = [];
        for (const el of document.querySelectorAll('.figure, .table-wrap, pre, table')) {
            if (el.scrollWidth > el.clientWidth + 1 || el.scrollHeight > el.clientHeight + 1) bad.push(el.id || el.className);
        }
        const doc = document.documentElement;
        if (doc.scrollWidth > doc.clientWidth + 1) bad.push('page ' + doc.scrollWidth);
        return bad;
    }""")
    assert clipped == []
    page.pdf(path=str(artifacts / "report.pdf"), prefer_css_page_size=True, print_background=True)
    assert log.errors == []
