"""Time a qviz session against the plain PyTorch FX pipeline doing the same work.

Model: ``qviz.models.resnet18(num_classes=1000)`` (seed 0, eval mode) at 224x224, calibrated on
32 random-normal images (4 batches of 8) and compared on one batch of 8 images. No downloads.

- plain: ``prepare_fx(deepcopy(model).eval(), get_default_qconfig_mapping("x86"), example)``,
  calibration, ``convert_fx(deepcopy(prepared))``, then the FX numeric suite as its docstring
  shows it: ``extract_weights`` + ``add_loggers`` (OutputLogger) + ``add_shadow_loggers`` on
  the comparison batch, each result extended with ``compute_sqnr`` through
  ``extend_logger_results_with_comparison``.
- qviz: ``Session(model, calib, flow="fx", backend="x86", eval_data=[batch],
  progress=False).run().to_dataframe()``.

The two runs alternate (plain, qviz, plain, qviz, ...) after an untimed warm-up of each, and the
medians are compared. Targets: qviz no slower than 1.5x the plain pipeline with the numeric
suite, and no slower than 1.3x prepare / calibrate / convert alone (which compares nothing).

    python bench/capture.py              # full: 3 repeats, several minutes on 2 cores
    python bench/capture.py --quick      # smoke: 2 calib batches of 4 at 112x112, 1 repeat
    python bench/capture.py --profile    # also cProfile one qviz run (top 30 by cumtime)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import cProfile
import gc
import io
import os
import platform
import pstats
import statistics
import sys
import time
import warnings

for _category in (DeprecationWarning, UserWarning, FutureWarning):
    warnings.filterwarnings("ignore", category=_category, module=r"torch(\.|$)")

import torch  # noqa: E402
import torch.ao.ns._numeric_suite_fx as ns  # noqa: E402
from common import make_data, quiet_warnings  # noqa: E402
from torch.ao.ns.fx.utils import compute_sqnr  # noqa: E402
from torch.ao.quantization import get_default_qconfig_mapping  # noqa: E402
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx  # noqa: E402

import qviz  # noqa: E402
from qviz.models import resnet18  # noqa: E402

TARGET_RATIO = 1.5  # against the pipeline with the numeric suite
PIPELINE_TARGET = 1.3  # against prepare / calibrate / convert alone, no comparison at all
STAGES = ("prepare", "calibrate", "convert", "NS compare")




def run_plain(model, calib, comparison) -> tuple[dict[str, float], dict]:
    """The plain torch.ao FX pipeline with the numeric suite; returns stage times and results."""
    times: dict[str, float] = {}
    before = torch.backends.quantized.engine
    torch.backends.quantized.engine = "x86"
    try:
        c0, t0 = time.process_time(), time.perf_counter()
        prepared = prepare_fx(
            copy.deepcopy(model).eval(), get_default_qconfig_mapping("x86"), (calib[0],)
        )
        t1 = time.perf_counter()
        with torch.no_grad():
            for batch in calib:
                prepared(batch)
        t2 = time.perf_counter()
        quantized = convert_fx(copy.deepcopy(prepared))  # convert_fx works in place
        t3 = time.perf_counter()

        weights = ns.extract_weights("fp32", prepared, "int8", quantized)
        ns.extend_logger_results_with_comparison(weights, "fp32", "int8", compute_sqnr, "sqnr")

        fp32_ns, int8_ns = ns.add_loggers(
            "fp32", copy.deepcopy(prepared), "int8", copy.deepcopy(quantized), ns.OutputLogger
        )
        with torch.no_grad():
            fp32_ns(comparison)
            int8_ns(comparison)
        acts = ns.extract_logger_info(fp32_ns, int8_ns, ns.OutputLogger, "int8")
        ns.extend_logger_results_with_comparison(acts, "fp32", "int8", compute_sqnr, "sqnr")

        with contextlib.redirect_stdout(io.StringIO()):  # "skipping shadow loggers for ..."
            shadow = ns.add_shadow_loggers(
                "fp32", copy.deepcopy(prepared), "int8", copy.deepcopy(quantized), ns.OutputLogger
            )
        with torch.no_grad():
            shadow(comparison)
        local = ns.extract_shadow_logger_info(shadow, ns.OutputLogger, "int8")
        ns.extend_logger_results_with_comparison(local, "fp32", "int8", compute_sqnr, "sqnr")
        t4, c4 = time.perf_counter(), time.process_time()
    finally:
        torch.backends.quantized.engine = before
    times.update(zip(STAGES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True))
    times["total"] = t4 - t0
    times["cpu"] = c4 - c0
    return times, {"weights": weights, "activations": acts, "shadow": local}


def run_qviz(model, calib, comparison):
    """One qviz session, frame included; returns ({"total": wall s, "cpu": CPU s}, session, frame)."""
    c0, t0 = time.process_time(), time.perf_counter()
    session = qviz.Session(
        model, calib, flow="fx", backend="x86", eval_data=[comparison], progress=False
    ).run()
    frame = session.to_dataframe()
    t1, c1 = time.perf_counter(), time.process_time()
    return {"total": t1 - t0, "cpu": c1 - c0}, session, frame


def fmt(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each (default 3)")
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed runs of each first (default 1, quick 0)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 2 calib batches of 4 at 112x112, 1 repeat"
    )
    parser.add_argument(
        "--profile", action="store_true", help="then cProfile one qviz run (top 30 by cumtime)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = 1
    warmup = args.warmup if args.warmup is not None else (0 if args.quick else 1)
    if args.repeats < 1 or warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    quiet_warnings()

    torch.manual_seed(0)
    model = resnet18(num_classes=1000).eval()
    calib, comparison, what = make_data(args.quick)

    print(
        f"qviz capture benchmark: qviz {qviz.__version__}, torch {torch.__version__}, "
        f"Python {platform.python_version()}"
    )
    print(
        f"machine: {os.cpu_count()} cores, torch.get_num_threads() = {torch.get_num_threads()} "
        f"(default, not set), quantized engine x86 for both"
    )
    print(
        f"model: resnet18(num_classes=1000), {sum(p.numel() for p in model.parameters()):,} "
        f"parameters; data: {what} (random normal)"
    )
    print(
        f"runs: {warmup} untimed warm-up + {args.repeats} timed of each, interleaved "
        "plain, qviz, plain, qviz, ..."
    )
    sys.stdout.flush()

    plain_runs: list[dict[str, float]] = []
    qviz_runs: list[dict[str, float]] = []
    for i in range(warmup + args.repeats):
        timed = i >= warmup
        label = f"run {i - warmup + 1}/{args.repeats}" if timed else f"warm-up {i + 1}/{warmup}"
        gc.collect()
        plain_times, plain_results = run_plain(model, calib, comparison)
        gc.collect()
        q_times, session, frame = run_qviz(model, calib, comparison)
        stages = ", ".join(f"{s} {plain_times[s]:.2f}" for s in STAGES)
        print(
            f"  {label}: plain {plain_times['total']:.2f} s ({stages}); "
            f"qviz {q_times['total']:.2f} s; qviz/plain {q_times['total'] / plain_times['total']:.2f}x "
            f"(CPU s: plain {plain_times['cpu']:.1f}, qviz {q_times['cpu']:.1f})",
            flush=True,
        )
        if timed:
            plain_runs.append(plain_times)
            qviz_runs.append(q_times)

    plain_med = {k: statistics.median(r[k] for r in plain_runs) for k in (*STAGES, "total", "cpu")}
    qviz_med = statistics.median(r["total"] for r in qviz_runs)
    qviz_cpu = statistics.median(r["cpu"] for r in qviz_runs)
    ratio = qviz_med / plain_med["total"]
    pipeline = [sum(r[s] for s in STAGES[:3]) for r in plain_runs]
    pipeline_ratio = qviz_med / statistics.median(pipeline)
    pair_ratio = statistics.median(
        q["total"] / p["total"] for p, q in zip(plain_runs, qviz_runs, strict=True)
    )

    print()
    rows = [(f"  {s}", plain_med[s], None, None) for s in STAGES]
    rows.append(("total (session / pipeline)", plain_med["total"], qviz_med, ratio))
    rows.append(("session / prepare+calibrate+convert", statistics.median(pipeline), qviz_med,
                 pipeline_ratio))
    rows.append(
        ("CPU time (process_time)", plain_med["cpu"], qviz_cpu, qviz_cpu / plain_med["cpu"])
    )
    width = max(len(r[0]) for r in rows)
    print(f"{'step':<{width}}  {'plain median s':>14}  {'qviz median s':>13}  {'ratio':>6}")
    for step, p, q, r in rows:
        share = f" ({p / plain_med['total']:4.0%} of plain)" if q is None else ""
        print(
            f"{step:<{width}}  {fmt(p):>14}  {fmt(q):>13}  "
            f"{(f'{r:.2f}x' if r is not None else '-'):>6}{share}"
        )
    verdict = "met" if ratio <= TARGET_RATIO else "NOT met"
    print(
        f"\ntarget: qviz no slower than {TARGET_RATIO}x the plain pipeline -> "
        f"{ratio:.2f}x (ratio of medians), target {verdict}"
    )
    print(
        f"target: qviz no slower than {PIPELINE_TARGET}x prepare / calibrate / convert without "
        f"any comparison -> {pipeline_ratio:.2f}x, target "
        f"{'met' if pipeline_ratio <= PIPELINE_TARGET else 'NOT met'}"
    )
    print(
        f"median of the per-pair ratios: {pair_ratio:.2f}x (each qviz run over the plain run "
        "just before it; steadier when the machine's load drifts)"
    )

    records = list(session.results.records.values())
    nbytes = sum(r.stats.nbytes for r in records)
    roles: dict[str, int] = {}
    for r in records:
        roles[r.role] = roles.get(r.role, 0) + 1
    by_role = ", ".join(f"{n} {role}" for role, n in sorted(roles.items()))
    print(
        f"qviz capture memory: {nbytes:,} bytes ({nbytes / 2**20:.2f} MiB) over "
        f"{len(records)} points ({by_role})"
    )
    print(
        f"qviz frame: {len(frame)} layers; plain NS: {len(plain_results['weights'])} "
        f"weight pairs, {len(plain_results['activations'])} logged activations, "
        f"{len(plain_results['shadow'])} shadowed layers"
    )

    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        run_qviz(model, calib, comparison)
        profiler.disable()
        out = io.StringIO()
        stats = pstats.Stats(profiler, stream=out).sort_stats("cumulative")
        stats.print_stats(30)
        print("\ncProfile of one qviz run (top 30 by cumtime):")
        print(out.getvalue())
        out.seek(0)
        out.truncate()
        stats.print_stats(r"/qviz/(session|capture|analysis|flows|io)/?", 30)
        print("the same run, qviz's own functions only (top 30 by cumtime):")
        print(out.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
