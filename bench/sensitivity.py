"""Time qviz's one-at-a-time sensitivity sweep against the naive per-layer loop, same ranking?

Model: ``qviz.models.resnet18(num_classes=1000)`` (seed 0, eval mode) at 224x224, calibrated on
32 random-normal images (4 batches of 8) and compared on one batch of 8 images. No downloads.

- qviz: ``Session(model, calib, flow="fx", backend="x86", eval_data=[batch],
  progress=False).run()`` once (timed and printed apart, not part of the ratio), then
  ``session.sensitivity()`` is timed: for every layer four mixed models (quantize only this
  layer, skip only this layer, weight only, output activation only) built from the statistics
  and modules the session already holds, each measured as the model output's SQNR on the batch.
- naive: for every layer, what one does without qviz to get the quantize-only figure:
  ``prepare_fx(deepcopy(model).eval(), mapping, example)`` with a ``QConfigMapping`` whose
  global qconfig is None and whose module-name entries give that layer (and the modules fused
  with it) the default x86 qconfig, calibration on the 32 images, ``convert_fx``, then the
  output SQNR (``torch.ao.ns.fx.utils.compute_sqnr``) against the float model on the batch.

The naive loop computes one figure per layer, the full sweep four; the sweep is also timed with
``variants=("quantize_only",)``, the naive loop's one figure, and both ratios are printed. Rankings: qviz's
``quantize_only`` against the naive SQNR, lowest SQNR first (Spearman's rank correlation and
the top 5). The sweep runs ``--repeats`` times (median; one run before the naive loop, the
rest after it); the naive loop once, as it takes minutes. Target: the sweep at least 10x faster.

    python bench/sensitivity.py              # full: every layer (21), several minutes on 2 cores
    python bench/sensitivity.py --layers 4   # the first 4 layers only, for both
    python bench/sensitivity.py --quick      # smoke: 2 calib batches of 4 at 112x112, batch 2
    python bench/sensitivity.py --threads 1  # torch.set_num_threads(1) first (default: torch's)
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import platform
import statistics
import sys
import time
import warnings

for _category in (DeprecationWarning, UserWarning, FutureWarning):
    warnings.filterwarnings("ignore", category=_category)

import pandas as pd  # noqa: E402
import torch  # noqa: E402
from common import make_data, quiet_warnings, timed  # noqa: E402
from torch.ao.ns.fx.utils import compute_sqnr  # noqa: E402
from torch.ao.quantization import QConfigMapping, get_default_qconfig_mapping  # noqa: E402
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx  # noqa: E402

import qviz  # noqa: E402
from qviz.analysis.sensitivity import VARIANTS, sweep  # noqa: E402
from qviz.models import resnet18  # noqa: E402

TARGET_SPEEDUP = 10.0
TOP = 5
STAGES = ("prepare", "calibrate", "convert", "evaluate")




def only_this_layer(model, layer: str) -> QConfigMapping:
    """Everything float but ``layer`` and the modules fused with it (FX wants one qconfig
    across a fused pattern), which get the default x86 qconfig."""
    qconfig = get_default_qconfig_mapping("x86").global_qconfig
    group = next((g for g in model.fusion_groups() if g[0] == layer), [layer])
    mapping = QConfigMapping().set_global(None)
    for name in group:
        mapping.set_module_name(name, qconfig)
    return mapping


def run_naive(model, calib, comparison, float_out, layer: str) -> tuple[float, dict[str, float]]:
    """Prepare, calibrate, convert with only ``layer`` quantized; its output SQNR and stage times."""
    before = torch.backends.quantized.engine
    torch.backends.quantized.engine = "x86"
    try:
        t0 = time.perf_counter()
        prepared = prepare_fx(
            copy.deepcopy(model).eval(), only_this_layer(model, layer), (calib[0],)
        )
        t1 = time.perf_counter()
        with torch.no_grad():
            for batch in calib:
                prepared(batch)
        t2 = time.perf_counter()
        quantized = convert_fx(prepared)
        t3 = time.perf_counter()
        with torch.no_grad():
            sqnr = float(compute_sqnr(float_out, quantized(comparison)))
        t4 = time.perf_counter()
    finally:
        torch.backends.quantized.engine = before
    return sqnr, dict(zip(STAGES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True))



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--layers",
        type=int,
        default=None,
        help="only the first N layers, for both (default: every layer)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed sweeps (default 3)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 2 calib batches of 4 at 112x112, comparison batch 2",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads(N) first (default: leave torch's default)",
    )
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    if args.repeats < 1 or (args.layers is not None and args.layers < 2):
        parser.error("--repeats must be >= 1 and --layers >= 2 (a ranking needs two)")
    quiet_warnings()

    torch.manual_seed(0)
    model = resnet18(num_classes=1000).eval()
    calib, comparison, what = make_data(args.quick)

    print(
        f"qviz sensitivity benchmark: qviz {qviz.__version__}, torch {torch.__version__}, "
        f"Python {platform.python_version()}"
    )
    print(
        f"machine: {os.cpu_count()} cores, torch.get_num_threads() = {torch.get_num_threads()} "
        f"({'set by --threads' if args.threads is not None else 'default, not set'}), "
        "quantized engine x86 for both"
    )
    print(
        f"model: resnet18(num_classes=1000), {sum(p.numel() for p in model.parameters()):,} "
        f"parameters; data: {what} (random normal)"
    )
    sys.stdout.flush()

    session, wall, cpu = timed(
        lambda: qviz.Session(
            model, calib, flow="fx", backend="x86", eval_data=[comparison], progress=False
        ).run()
    )
    quiet_warnings()
    every = list(session.to_dataframe().index)
    layers = every[: args.layers] if args.layers else every
    print(
        f"session.run() (setup, not in the ratio): {wall:.2f} s wall, {cpu:.1f} s CPU; "
        f"{len(every)} layers, measuring {len(layers)}"
        + (
            ""
            if len(layers) == len(every)
            else f" (--layers {args.layers}: {layers[0]} .. {layers[-1]})"
        )
    )
    print(
        f"runs: sweep x1, naive loop x1 (one prepare/calibrate/convert/evaluate per layer: "
        f"minutes, so not repeated), sweep x{args.repeats - 1}\n",
        flush=True,
    )

    def qviz_sweep(variants=VARIANTS):
        if len(layers) == len(every):
            return session.sensitivity(progress=False, variants=variants)
        return sweep(
            session.float_model(),
            session.quantized_model(),
            session._eval,
            layers,
            backend=session.backend,
            progress=False,
            cache_bytes=session.cache_bytes,
            variants=variants,
        )

    def quantize_only_sweep():
        return qviz_sweep(("quantize_only",))

    sweeps, singles = [], []
    found, wall, cpu = timed(qviz_sweep)
    sweeps.append((wall, cpu))
    print(f"  sweep 1/{args.repeats}: {wall:.2f} s wall, {cpu:.1f} s CPU", flush=True)
    _, wall, cpu = timed(quantize_only_sweep)
    singles.append((wall, cpu))
    print(f"  quantize-only sweep 1/{args.repeats}: {wall:.2f} s wall, {cpu:.1f} s CPU", flush=True)

    with torch.no_grad():
        float_out = model(comparison)
    naive, stages = {}, dict.fromkeys(STAGES, 0.0)
    c0, t0 = time.process_time(), time.perf_counter()
    for i, layer in enumerate(layers):
        gc.collect()
        naive[layer], times = run_naive(model, calib, comparison, float_out, layer)
        for k in STAGES:
            stages[k] += times[k]
        print(
            f"  naive {i + 1:>2}/{len(layers)} {layer:<22} {naive[layer]:7.2f} dB  "
            f"{sum(times.values()):6.2f} s ("
            + ", ".join(f"{k} {times[k]:.2f}" for k in STAGES)
            + ")",
            flush=True,
        )
    naive_wall, naive_cpu = time.perf_counter() - t0, time.process_time() - c0

    for r in range(1, args.repeats):
        again, wall, cpu = timed(qviz_sweep)
        sweeps.append((wall, cpu))
        pd.testing.assert_frame_equal(again.to_dataframe(), found.to_dataframe())
        print(f"  sweep {r + 1}/{args.repeats}: {wall:.2f} s wall, {cpu:.1f} s CPU", flush=True)
        single, wall, cpu = timed(quantize_only_sweep)
        singles.append((wall, cpu))
        pd.testing.assert_series_equal(single.to_dataframe()["quantize_only"], found.to_dataframe()["quantize_only"])
        print(f"  quantize-only sweep {r + 1}/{args.repeats}: {wall:.2f} s wall, {cpu:.1f} s CPU", flush=True)

    sweep_wall = statistics.median(w for w, _ in sweeps)
    sweep_cpu = statistics.median(c for _, c in sweeps)
    frame = found.to_dataframe()
    table = pd.DataFrame(
        {"qviz quantize_only dB": frame["quantize_only"], "naive dB": pd.Series(naive)}
    ).loc[layers]
    table["diff dB"] = table["qviz quantize_only dB"] - table["naive dB"]
    table["qviz rank"] = table["qviz quantize_only dB"].rank(method="min").astype(int)
    table["naive rank"] = table["naive dB"].rank(method="min").astype(int)
    rho = table["qviz quantize_only dB"].corr(table["naive dB"], method="spearman")
    top = min(TOP, len(table))
    top_qviz = list(table.sort_values("qviz quantize_only dB").index[:top])
    top_naive = list(table.sort_values("naive dB").index[:top])

    print(
        "\nper layer (rank 1 = most sensitive = lowest output SQNR with only that layer quantized):"
    )
    print(table.sort_values("qviz rank").to_string(float_format=lambda v: f"{v:.2f}"))
    print(
        f"\nnaive loop: {naive_wall:.1f} s wall, {naive_cpu:.1f} s CPU for {len(layers)} layers "
        f"(1 figure each; " + ", ".join(f"{k} {stages[k]:.1f} s" for k in STAGES) + ")"
    )
    print(
        f"qviz sweep: {sweep_wall:.2f} s wall, {sweep_cpu:.1f} s CPU, median of {len(sweeps)} "
        f"(4 figures each: quantize_only, skip_only, weight_only, activation_only; runs: "
        + ", ".join(f"{w:.2f}" for w, _ in sweeps)
        + " s)"
    )
    single_wall = statistics.median(w for w, _ in singles)
    single_cpu = statistics.median(c for _, c in singles)
    print(
        f"qviz quantize-only sweep (variants=('quantize_only',): the naive loop's one figure): "
        f"{single_wall:.2f} s wall, {single_cpu:.1f} s CPU, median of {len(singles)}"
    )
    for what, wall, cpu in (("full sweep", sweep_wall, sweep_cpu), ("quantize-only sweep", single_wall, single_cpu)):
        ratio = naive_wall / wall
        print(
            f"naive / {what}: {ratio:.1f}x wall, {naive_cpu / cpu:.1f}x CPU -> target "
            f">= {TARGET_SPEEDUP:g}x {'met' if ratio >= TARGET_SPEEDUP else 'NOT met'}"
        )
    print(f"largest |qviz - naive| quantize-only SQNR: {table['diff dB'].abs().max():.3f} dB")
    print(
        f"ranking: Spearman rho = {rho:.4f}; top {top} equal as sets: "
        f"{set(top_qviz) == set(top_naive)}, in order: {top_qviz == top_naive}"
    )
    print(f"  qviz  top {top}: {', '.join(top_qviz)}")
    print(f"  naive top {top}: {', '.join(top_naive)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
