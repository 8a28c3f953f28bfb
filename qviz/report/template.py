"""The report's page skeleton and style sheet (screen and print)."""

from __future__ import annotations

#: The page; every value substituted into it is already escaped HTML (packed plotly.js is base64).
PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="qviz {version}">
<title>{title}</title>
<style>{css}</style>
<script id="qviz-plotly" type="application/octet-stream">{plotlyjs}</script>
<script>{loader}</script>
</head>
<body>
<main>
{body}
</main>
</body>
</html>
"""

#: Unpacks plotly.js (gzip, base64) once; each figure's script waits for it (``qvizPlot``).
LOADER = """
window.qvizPlotly = (async () => {
  const packed = document.getElementById("qviz-plotly").textContent.trim();
  const bytes = Uint8Array.from(atob(packed), (c) => c.charCodeAt(0));
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"));
  const script = document.createElement("script");
  script.textContent = await new Response(stream).text();
  document.head.appendChild(script);
})();
function qvizPlot(id, figure, config) {
  window.qvizPlotly.then(() => Plotly.newPlot(id, figure.data, figure.layout, config));
}
"""

# Content is at most 940 px wide: plotly draws each figure at its container's width, and 940 px
# fits a landscape A4 or Letter page (about 980 px inside 10 mm margins), so printed figures are
# never cut. Nothing has a fixed height or clips its overflow when printed.
CSS = """
:root { color-scheme: light; }
body { margin: 0; background: #fff; color: #222;
       font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; }
main { max-width: 940px; margin: 0 auto; padding: 16px 20px 48px; }
h1 { font-size: 22px; margin: 8px 0 2px; }
h2 { font-size: 17px; margin: 28px 0 8px; padding-bottom: 3px; border-bottom: 1px solid #ddd; }
h3 { font-size: 14px; margin: 14px 0 4px; }
.meta { color: #666; margin: 0 0 8px; }
nav { margin: 6px 0 4px; }
nav a { margin-right: 14px; color: #1f5fa8; text-decoration: none; }
p.note { color: #444; background: #f6f6f6; border-left: 3px solid #bbb; padding: 6px 10px; }
.figure { margin: 6px 0 14px; }
.table-wrap { overflow-x: auto; margin: 6px 0 14px; }
table { border-collapse: collapse; font-size: 12px; font-variant-numeric: tabular-nums; }
caption { text-align: left; color: #555; padding: 2px 0 4px; }
th, td { border: 1px solid #ddd; padding: 3px 6px; text-align: left; vertical-align: top; }
thead th { background: #f3f3f3; }
tbody th { font-weight: 600; }
td.num { text-align: right; white-space: nowrap; }
table.summary th { background: #f7f7f7; font-weight: 600; }
pre { background: #f7f7f7; border: 1px solid #e3e3e3; padding: 10px; overflow-x: auto; font-size: 12px; }
@page { size: landscape; margin: 10mm; }
@media print {
  main { max-width: none; padding: 0; }
  nav { display: none; }
  h2, h3 { break-after: avoid; }
  .figure, tr { break-inside: avoid; }
  .table-wrap, pre { overflow: visible; }
  table { font-size: 8pt; }
  th, td { overflow-wrap: anywhere; }
  td.num { white-space: normal; }
  pre { white-space: pre-wrap; overflow-wrap: anywhere; font-size: 8pt; }
}
"""
