"""Peak memory and sweep time of qviz on a GPT-2-small-sized (124M parameter) language model.

Model: ``transformers.GPT2LMHeadModel(GPT2Config(n_layer=12, n_embd=768, n_head=12,
vocab_size=50257))``, random init (seed 0), no download; GPT-2's ``Conv1D`` layers are rewritten
as the equivalent ``nn.Linear`` (weight transposed, same outputs) first, since torch's
``quantize_dynamic`` and torchao's ``quantize_`` quantize ``nn.Linear`` only: 49 linears (the
tied ``lm_head`` included). Data: 2 calibration batches and 1 evaluation batch of 2 x 64 random
token ids.

Each flow ("dynamic", "torchao") runs in a fresh subprocess: torch, transformers and qviz
imported, the float model built, then the baseline is that process's resident set (VmRSS).
Before each step the kernel's peak-RSS mark is reset (``/proc/self/clear_refs``, 5) and after it
the peak (VmHWM) less the baseline is that step's peak: the session's copies, activations and
statistics, everything torch allocates (tracemalloc does not see it). Steps: ``Session(...).run()``,
``s.outliers()``, ``s.sensitivity(variants=("quantize_only",))`` and ``s.sensitivity()`` (every
variant the flow has: skip_only and weight_only too; activation_only needs static output qparams).
The limit for a sweep is N/2 forwards of the evaluation batch per figure (N layers swept: a
layer's swap has on average half the model downstream of it), the float model's forward timed in
the same process (median of 9: 3 before, between and after the sweeps). Ratios printed: peak / float bytes (parameters and buffers, tied
weights once), sweep time / limit; medians over ``--repeats`` processes.

    python bench/llm.py              # GPT-2 small: a few minutes per flow on 2 cores
    python bench/llm.py --small      # n_layer=2, n_embd=64, vocab 512: a smoke run (~1 min); the
                                     # targets are for the full size (fixed overheads dominate here)
    python bench/llm.py --repeats 3 --flows dynamic
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

FLOWS = ("dynamic", "torchao")
SIZES = {  # GPT2Config arguments, (batch, sequence length)
    "full": ({"n_layer": 12, "n_embd": 768, "n_head": 12, "vocab_size": 50257}, (2, 64)),
    "small": ({"n_layer": 2, "n_embd": 64, "n_head": 2, "vocab_size": 512}, (2, 16)),
}
MEMORY_TARGET, SWEEP_TARGET = 3.0, 2.0


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    """Set the kernel's peak-RSS mark (VmHWM) to the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def build(size: str):
    """(GPT-2 with Linear layers, calibration batches, evaluation batches, float bytes)."""
    import torch
    import transformers as tf
    from torch import nn

    config, (batch, seq) = SIZES[size]
    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(tf.GPT2Config(n_positions=max(seq, 64), **config)).eval()
    for name, module in list(model.named_modules()):
        if type(module).__name__ == "Conv1D":  # y = x @ W + b, W of shape (in, out)
            linear = nn.Linear(*module.weight.shape)
            with torch.no_grad():
                linear.weight.copy_(module.weight.t())
                linear.bias.copy_(module.bias)
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, linear)
    gen = torch.Generator().manual_seed(1)
    tokens = lambda: {"input_ids": torch.randint(0, config["vocab_size"], (batch, seq), generator=gen)}  # noqa: E731
    calib, evals = [tokens(), tokens()], [tokens()]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in (*model.parameters(), *model.buffers())}
    return model, calib, evals, sum(storages.values())


def child(flow: str, size: str) -> dict:
    """One flow's figures, in this (fresh) process."""
    import gc
    import warnings

    for category in (DeprecationWarning, UserWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)
    import torch

    import qviz
    from qviz.analysis.sensitivity import VARIANTS
    from qviz.flows.base import call_model

    model, calib, evals, float_bytes = build(size)
    gc.collect()
    baseline = _status_kib("VmRSS")
    found = {"flow": flow, "float_bytes": float_bytes,
             "parameters": sum(p.numel() for p in model.parameters())}

    def step(name, fn):
        gc.collect()
        _reset_peak()
        t0 = time.perf_counter()
        result = fn()
        found[f"{name}_s"] = time.perf_counter() - t0
        found[f"{name}_peak"] = (_status_kib("VmHWM") - baseline) * 1024
        gc.collect()
        found[f"{name}_held"] = (_status_kib("VmRSS") - baseline) * 1024  # after the step
        return result

    kwargs = {"scheme": "int8_dynamic"} if flow == "torchao" else {}
    session = step("run", lambda: qviz.Session(model, calib, flow=flow, eval_data=evals, progress=False,
                                               **kwargs).run())
    found["layers"] = len(session.to_dataframe())
    step("outliers", session.outliers)
    times = []

    def forwards():  # timed before, between and after the sweeps: the machine's load changes
        with torch.no_grad():
            for _ in range(3):
                t0 = time.perf_counter()
                call_model(model, evals[0])
                times.append(time.perf_counter() - t0)

    forwards()
    step("sweep1", lambda: session.sensitivity(variants=("quantize_only",), progress=False))
    forwards()
    full = step("sweep", lambda: session.sensitivity(progress=False)).to_dataframe()
    forwards()
    found["forward_s"] = statistics.median(times)
    table = session.to_dataframe()
    swept = full.loc[table.index[table["quantized"].astype(bool)]]  # the others need no work
    found["swept"] = len(swept)
    found["figures"] = int(sum(swept[v].notna().any() for v in VARIANTS))
    return found


def run_child(flow: str, size: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", flow, *(["--small"] if size == "small" else [])],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"bench/llm.py --child {flow} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a tiny GPT-2 (smoke run, seconds)")
    parser.add_argument("--repeats", type=int, default=1, help="fresh processes per flow (median)")
    parser.add_argument("--flows", nargs="+", choices=FLOWS, default=list(FLOWS))
    parser.add_argument("--child", choices=FLOWS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    size = "small" if args.small else "full"
    if args.child:
        print(json.dumps(child(args.child, size)))
        return 0
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    import torch

    config, (batch, seq) = SIZES[size]
    print(f"qviz LLM scale benchmark: torch {torch.__version__}, Python {platform.python_version()}, "
          f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}")
    print(f"model: GPT2LMHeadModel({', '.join(f'{k}={v}' for k, v in config.items())}), Conv1D as nn.Linear; "
          f"data: 2 calib batches, 1 eval batch of {batch} x {seq} token ids\n", flush=True)
    rows = []
    for flow in args.flows:
        runs = []
        for r in range(args.repeats):
            runs.append(run_child(flow, size))
            got = runs[-1]
            print(f"  {flow} {r + 1}/{args.repeats}: " + ", ".join(
                f"{k} {got[k + '_s']:.2f} s / peak {got[k + '_peak'] / 2**20:.0f} MiB "
                f"(after: {got[k + '_held'] / 2**20:.0f})"
                for k in ("run", "outliers", "sweep1", "sweep")) + f", forward {got['forward_s']:.3f} s", flush=True)
        def med(key, runs=runs):
            return statistics.median(r[key] for r in runs)

        first = runs[0]
        peak = max(med(f"{k}_peak") for k in ("run", "outliers", "sweep1", "sweep"))
        limit = first["swept"] / 2 * med("forward_s")
        rows.append({
            "flow": flow, "params (M)": first["parameters"] / 1e6, "float MiB": first["float_bytes"] / 2**20,
            "layers swept": first["swept"], "run s": med("run_s"), "outliers s": med("outliers_s"),
            "peak MiB": peak / 2**20, "peak / float": peak / first["float_bytes"],
            "forward s": med("forward_s"),
            "q-only sweep s": med("sweep1_s"), "q-only / limit": med("sweep1_s") / limit,
            "figures": first["figures"], "sweep s": med("sweep_s"),
            "sweep / limit": med("sweep_s") / (first["figures"] * limit),
        })
    import pandas as pd

    table = pd.DataFrame(rows).set_index("flow")
    print("\n" + table.T.to_string(float_format=lambda v: f"{v:.3g}"))
    print(f"\npeak / float: the largest step's peak RSS over the float model's bytes, target <= {MEMORY_TARGET:g}x; "
          f"q-only / limit: s.sensitivity(variants=('quantize_only',)) over N/2 float forwards; sweep / limit: "
          f"the default sweep over figures x N/2 forwards; target <= {SWEEP_TARGET:g}x")
    for flow, row in table.iterrows():
        print(f"  {flow}: memory {'met' if row['peak / float'] <= MEMORY_TARGET else 'NOT met'}, "
              f"quantize-only sweep {'met' if row['q-only / limit'] <= SWEEP_TARGET else 'NOT met'}, "
              f"full sweep {'met' if row['sweep / limit'] <= SWEEP_TARGET else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
