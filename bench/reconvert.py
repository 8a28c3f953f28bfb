"""Time ``Session.apply`` after a one-layer change against the plain PyTorch FX pipeline.

Model: ``qviz.models.resnet18(num_classes=1000)`` (seed 0, eval mode) at 224x224, calibrated on
32 random-normal images (4 batches of 8) and compared on one batch of 8 images. No downloads.

- apply: a ``Session(model, calib, flow="fx", backend="x86", eval_data=[batch],
  progress=False).run()`` is built once (untimed here; ``bench/capture.py`` times it); then
  ``session.apply({layer: {"weight": "per_tensor"}})`` is timed. It rebuilds that layer from
  the statistics recorded at calibration and re-measures it and the layers after it.
  ``session.undo()`` (itself an apply back to per-channel weights) is timed too but reported
  apart, so every timed apply really changes something.
- naive: the same resulting plan from scratch, as one would without qviz:
  ``prepare_fx(deepcopy(model).eval(), plan_qconfig_mapping(plan), example)``, calibration on
  the 32 images, ``convert_fx(deepcopy(prepared))``, then the FX numeric suite on the comparison
  batch: ``extract_weights`` + ``add_loggers`` (OutputLogger) + ``add_shadow_loggers``, each
  extended with ``compute_sqnr`` through ``extend_logger_results_with_comparison``.

Three layers are measured apart, since apply re-measures only the layers from the change on: a
late one ("fc"), a middle one ("layer3.0.conv1") and an early one ("layer1.0.conv1"). For each
repeat and each layer the two run back to back (naive, apply, undo), and the medians are
compared. Targets: apply at least 10x faster than naive, and under 0.5 s (median).

    python bench/reconvert.py              # full: 3 repeats, many minutes on 2 cores
    python bench/reconvert.py --quick      # smoke: 2 calib batches of 4 at 112x112, batch 2
    python bench/reconvert.py --profile    # also cProfile one apply (top 25 by cumtime)
    python bench/reconvert.py --threads 1  # torch.set_num_threads(1) first (default: torch's)

On a small, shared machine the thread count matters: with 2 intra-op threads on 2 busy cores,
an apply (many small kernels) often waits on a descheduled peer thread and its time swings by
10x; run both ways to tell the code's cost from the machine's load.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import cProfile
import gc
import io
import math
import os
import platform
import pstats
import statistics
import sys
import time
import warnings

for _category in (DeprecationWarning, UserWarning, FutureWarning):
    warnings.filterwarnings("ignore", category=_category)

import torch  # noqa: E402
import torch.ao.ns._numeric_suite_fx as ns  # noqa: E402
from common import make_data, quiet_warnings, timed  # noqa: E402
from torch.ao.ns.fx.utils import compute_sqnr  # noqa: E402
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx  # noqa: E402

import qviz  # noqa: E402
from qviz.flows.torch_ao.fx import plan_qconfig_mapping  # noqa: E402
from qviz.models import resnet18  # noqa: E402

TARGET_SPEEDUP = 10.0
TARGET_SECONDS = 0.5
LAYERS = (("late", "fc"), ("middle", "layer3.0.conv1"), ("early", "layer1.0.conv1"))
CHANGE = {"weight": "per_tensor"}
STAGES = ("prepare", "calibrate", "convert", "NS compare")




def run_naive(model, calib, comparison, plan) -> tuple[dict[str, float], dict]:
    """The plain torch.ao FX pipeline for ``plan``, numeric suite included; returns stage times
    (wall s, plus "total" and "cpu") and the three NS result dicts."""
    before = torch.backends.quantized.engine
    torch.backends.quantized.engine = "x86"
    try:
        c0, t0 = time.process_time(), time.perf_counter()
        prepared = prepare_fx(copy.deepcopy(model).eval(), plan_qconfig_mapping(plan), (calib[0],))
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
    times = dict(zip(STAGES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True))
    times["total"], times["cpu"] = t4 - t0, c4 - c0
    return times, {"weights": weights, "activations": acts, "shadow": local}


def ns_sqnr(results: dict, fqn: str) -> float:
    """The int8-side SQNR the numeric suite reports for the node whose fqn is ``fqn``."""
    for by_type in results.values():
        for by_model in by_type.values():
            for entry in by_model.get("int8", []):
                if entry.get("fqn") == fqn and entry.get("sqnr"):
                    return float(entry["sqnr"][0])
    return math.nan



def fmt(seconds: float) -> str:
    return f"{seconds:.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per layer (default 3)")
    parser.add_argument(
        "--warmup", type=int, default=None,
        help="untimed apply+undo pairs per layer first (default 1, quick 0)",
    )
    parser.add_argument(
        "--quick", action="store_true",
        help="smoke run: 2 calib batches of 4 at 112x112, comparison batch 2, 1 repeat",
    )
    parser.add_argument(
        "--profile", action="store_true",
        help="then cProfile one apply on the early layer (top 25 by cumtime)",
    )
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch.set_num_threads(N) before anything runs (default: leave torch's default)",
    )
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    if args.quick:
        args.repeats = 1
    warmup = args.warmup if args.warmup is not None else (0 if args.quick else 1)
    if args.repeats < 1 or warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    quiet_warnings()

    torch.manual_seed(0)
    model = resnet18(num_classes=1000).eval()
    calib, comparison, what = make_data(args.quick)

    print(f"qviz apply (re-convert) benchmark: qviz {qviz.__version__}, torch {torch.__version__}, "
          f"Python {platform.python_version()}")
    print(f"machine: {os.cpu_count()} cores, torch.get_num_threads() = {torch.get_num_threads()} "
          f"({'set by --threads' if args.threads is not None else 'default, not set'}), "
          "quantized engine x86 for both")
    print(f"model: resnet18(num_classes=1000), {sum(p.numel() for p in model.parameters()):,} "
          f"parameters; data: {what} (random normal)")
    print(f"change: {CHANGE} on one layer; layers: "
          + ", ".join(f"{label} {name!r}" for label, name in LAYERS))
    print(f"runs: {warmup} untimed apply+undo per layer, then {args.repeats} timed per layer, "
          "interleaved naive, apply, undo")
    sys.stdout.flush()

    c0, t0 = time.process_time(), time.perf_counter()
    session = qviz.Session(
        model, calib, flow="fx", backend="x86", eval_data=[comparison], progress=False
    ).run()
    quiet_warnings()
    frame0 = session.to_dataframe()
    print(f"session.run() (untimed setup, once): {time.perf_counter() - t0:.2f} s wall, "
          f"{time.process_time() - c0:.1f} s CPU; {len(frame0)} layers\n", flush=True)
    base_plan = session.plan

    for _ in range(warmup):
        for _label, layer in LAYERS:
            session.apply({layer: CHANGE})
            session.undo()

    naive: dict[str, list[dict[str, float]]] = {layer: [] for _, layer in LAYERS}
    apply: dict[str, list[tuple[float, float]]] = {layer: [] for _, layer in LAYERS}
    undo: dict[str, list[tuple[float, float]]] = {layer: [] for _, layer in LAYERS}
    checks: dict[str, dict[str, tuple[float, float]]] = {}
    for r in range(args.repeats):
        for label, layer in LAYERS:
            target = session.plan.with_changes({layer: CHANGE})
            assert target != session.plan, f"{CHANGE} changes nothing on {layer}"
            gc.collect()
            n_times, n_results = run_naive(model, calib, comparison, target)
            _, a_wall, a_cpu = timed(lambda layer=layer: session.apply({layer: CHANGE}))
            assert session.plan == target, "apply did not reach the naive pipeline's plan"
            frame = session.to_dataframe()
            _, u_wall, u_cpu = timed(session.undo)
            assert session.plan == base_plan, "undo did not restore the plan"
            naive[layer].append(n_times)
            apply[layer].append((a_wall, a_cpu))
            undo[layer].append((u_wall, u_cpu))
            if layer not in checks:
                row = frame.loc[layer]
                checks[layer] = {
                    c: (float(row[c]), ns_sqnr(n_results[k], layer))
                    for c, k in (("weight_sqnr", "weights"), ("output_sqnr", "activations"),
                                 ("local_sqnr", "shadow"))
                }
                checks[layer]["weight_sqnr before"] = (float(frame0.loc[layer, "weight_sqnr"]),
                                                       math.nan)
            stages = ", ".join(f"{s} {n_times[s]:.2f}" for s in STAGES)
            print(f"  run {r + 1}/{args.repeats} {label:<6} {layer:<15} naive {n_times['total']:7.2f} s "
                  f"({stages}); apply {a_wall:.3f} s; undo {u_wall:.3f} s; "
                  f"naive/apply {n_times['total'] / a_wall:6.1f}x "
                  f"(CPU s: naive {n_times['cpu']:.1f}, apply {a_cpu:.3f})", flush=True)

    print()
    header = (f"{'layer':<22}  {'naive med s':>11}  {'apply med s':>11}  {'naive/apply':>11}  "
              f"{'CPU ratio':>9}  {'apply min s':>11}  {'undo med s':>10}  {'< 0.5 s':>7}  {'>= 10x':>6}")
    print(header)
    verdicts = []
    for label, layer in LAYERS:
        n_med = statistics.median(t["total"] for t in naive[layer])
        n_cpu = statistics.median(t["cpu"] for t in naive[layer])
        a_med = statistics.median(w for w, _ in apply[layer])
        a_cpu = statistics.median(c for _, c in apply[layer])
        a_min = min(w for w, _ in apply[layer])
        u_med = statistics.median(w for w, _ in undo[layer])
        ratio = n_med / a_med
        fast, speedup = a_med < TARGET_SECONDS, ratio >= TARGET_SPEEDUP
        verdicts += [fast, speedup]
        print(f"{label + ' ' + layer:<22}  {fmt(n_med):>11}  {fmt(a_med):>11}  {ratio:10.1f}x  "
              f"{n_cpu / a_cpu:8.1f}x  {fmt(a_min):>11}  {fmt(u_med):>10}  {'met' if fast else 'NOT':>7}  "
              f"{'met' if speedup else 'NOT':>6}")
    print(f"\ntargets: apply at least {TARGET_SPEEDUP:g}x faster than the naive pipeline and under "
          f"{TARGET_SECONDS} s (medians of wall time) -> "
          f"{'all met' if all(verdicts) else 'NOT all met'}")
    print("CPU ratio: naive CPU s / apply CPU s (process_time; with 2+ threads it counts spinning "
          "too); undo is an apply back to per-channel, timed apart")

    print("\nsame work? the changed layer after apply (qviz frame) vs the naive pipeline's "
          "numeric suite (first repeat):")
    for _label, layer in LAYERS:
        c = checks[layer]
        print(f"  {layer:<15} weight_sqnr {c['weight_sqnr before'][0]:.2f} -> "
              f"qviz {c['weight_sqnr'][0]:.2f} / NS {c['weight_sqnr'][1]:.2f}; "
              f"output_sqnr qviz {c['output_sqnr'][0]:.2f} / NS {c['output_sqnr'][1]:.2f}; "
              f"local_sqnr qviz {c['local_sqnr'][0]:.2f} / NS shadow {c['local_sqnr'][1]:.2f}")

    if args.profile:
        layer = LAYERS[-1][1]
        profiler = cProfile.Profile()
        gc.collect()
        profiler.enable()
        session.apply({layer: CHANGE})
        profiler.disable()
        session.undo()
        out = io.StringIO()
        stats = pstats.Stats(profiler, stream=out).sort_stats("cumulative")
        stats.print_stats(25)
        print(f"\ncProfile of one apply on {layer!r} (top 25 by cumtime):")
        print(out.getvalue())
        out.seek(0)
        out.truncate()
        stats.sort_stats("tottime").print_stats(15)
        print("the same apply, top 15 by tottime:")
        print(out.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
