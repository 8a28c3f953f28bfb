"""Per-layer float-vs-quantized comparison on evaluation batches, plus model-level figures.

``reference`` is the float model fused like the quantized one, with the same module names (see
:mod:`qviz.flows.base`). For each layer:

- ``output_sqnr``: quantized model's output at the layer vs the reference's output at the layer,
  both fed the same batch (error accumulated from upstream included);
- ``local_sqnr``: the layer's quantized output vs the reference layer fed the quantized model's
  (dequantized) input to that layer: this layer's own error, as PyTorch's shadow loggers measure;
- ``weight_sqnr``: the reference weight (BN folded) vs the dequantized quantized weight.

Only sums are kept across batches; per batch the reference outputs of all layers are held once.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from qviz.analysis.metrics import ErrorAccumulator, sqnr
from qviz.errors import ConfigError, ModelError
from qviz.flows.base import call_model
from qviz.flows.layers import is_torchao_weight
from qviz.flows.torchao.formats import block_scales, format_of
from qviz.flows.tracing import TRACE_LOCK

_OUTPUT_KEYS = ("logits", "last_hidden_state")


def _run(model: nn.Module, batch, index: int):
    """The model on one batch, never beside a trace on another thread (see qviz.flows.tracing)."""
    with TRACE_LOCK.running():
        return call_model(model, batch)


def _floating(value) -> bool:
    return isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_quantized)


def _first_floating(value):
    """The first floating (or quantized) tensor in ``value``, depth first; None if it holds none."""
    if _floating(value):
        return value
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        for item in value:
            found = _first_floating(item)
            if found is not None:
                return found
    return None


def choose_output(value):
    """The tensor compared for what a model or a layer returned (None if it holds none):

    a tensor as it is; a mapping or ``ModelOutput``: ``logits``, else ``last_hidden_state``, else
    its first floating tensor; a tuple or list: its first floating tensor, depth first (an LSTM:
    the output sequence, not the hidden state). ``Session(..., output_fn=)`` overrides it for
    the model's output.
    """
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, Mapping):
        for key in _OUTPUT_KEYS:
            if isinstance(value.get(key), torch.Tensor):
                return value[key]
    return _first_floating(value)


def model_output(value, output_fn=None) -> torch.Tensor:
    """The model's compared output as a float tensor: ``output_fn(value)`` or :func:`choose_output`."""
    if output_fn is not None:
        chosen = output_fn(value)
        if not isinstance(chosen, torch.Tensor):
            raise ConfigError(f"output_fn must return the tensor to compare, it returned {type(chosen).__name__}")
    else:
        chosen = choose_output(value)
        if chosen is None:
            raise ModelError(
                f"the model returned {type(value).__name__} holding no floating tensor to compare: pass "
                "Session(..., output_fn=lambda out: ...) returning the tensor to compare (e.g. the logits)"
            )
    return _float(chosen).detach()


def _kept(value) -> torch.Tensor | None:
    """A layer's compared output as float, copied where it is the layer's own tensor: an in-place
    op downstream (``ReLU(inplace=True)``) would overwrite it before it is compared."""
    chosen = choose_output(value)
    if chosen is None:
        return None
    result = _float(chosen)
    return (result.clone() if result is chosen else result).detach()


def _dequantized(t):
    """A layer input as its float op takes it: quantized tensors dequantized, all else untouched
    (token ids stay integer)."""
    if isinstance(t, torch.Tensor) and (t.is_quantized or is_torchao_weight(t)):
        return t.dequantize()
    return t


def _float(t):
    if not isinstance(t, torch.Tensor):
        return t
    if is_torchao_weight(t):
        return t.dequantize()
    if t.is_quantized:
        return t.dequantize()
    return t.float() if t.is_floating_point() else t  # token ids and masks stay integer


def _torchao_weight_info(qw) -> dict:
    """dtype, scheme, qparams and activation mode of a torchao quantized weight (number formats by
    their plan names; MX and NVFP4 with one scale per block)."""
    dtype = format_of(qw) or str(getattr(qw, "target_dtype", None) or qw.qdata.dtype).replace("torch.", "")
    dynamic = getattr(qw, "act_quant_kwargs", None) is not None or getattr(qw, "activation_quantization", None)
    scale = block_scales(qw)
    block = qw.block_size
    if isinstance(block, int):  # MXTensor, NVFP4Tensor: blocks of inputs along each row, i.e. groups
        granularity = f"per_group({block})"
    elif all(b == s for b, s in zip(block, qw.shape, strict=True)):
        granularity = "per_tensor"
    elif block[-1] == qw.shape[-1]:
        granularity = "per_channel"
    else:
        granularity = f"per_group({block[-1]})"
    zp = getattr(qw, "zero_point", None)
    symmetric = zp is None or not bool(torch.any(zp != 0))
    return {
        "weight_dtype": dtype,
        "weight_qscheme": f"{granularity}_{'symmetric' if symmetric else 'affine'}",
        "weight_scale": (qw.scale if scale is None else scale).detach().double().reshape(-1).numpy(),
        "weight_zero_point": (torch.zeros(1) if zp is None else zp).detach().double().reshape(-1).numpy(),
        "activation_mode": "dynamic" if dynamic else "weight-only",
    }


def float_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """Weights the quantized layer was made from: BN folded for QAT conv-bn, fused seq unwrapped."""
    own_weight = isinstance(getattr(module, "weight", None), torch.Tensor)
    if not own_weight and isinstance(module, nn.Sequential) and len(module):
        module = module[0]  # a fused float module (ConvReLU2d, LinearReLU, ...)
    if isinstance(module, nn.LSTM) or hasattr(module, "weight_ih_l0"):
        return {n: p.detach() for n, p in module.named_parameters() if n.startswith("weight")}
    weight = module.weight.detach()
    bn = getattr(module, "bn", None)
    if isinstance(bn, nn.modules.batchnorm._BatchNorm):  # QAT ConvBn*: fold as convert will
        weight, _ = fuse_conv_bn_weights(
            weight, None, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
        )
        weight = weight.detach()
    return {"weight": weight}


def quantized_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """The quantized layer's weights as stored (quantized tensors, or float16 kept as float)."""
    if hasattr(module, "get_weight"):  # dynamic LSTM
        return dict(module.get_weight())
    weight = module.weight() if callable(module.weight) else module.weight
    return {"weight": weight}


def _flat(weights: dict[str, torch.Tensor], keys: list[str]) -> torch.Tensor:
    """The weights of ``keys`` as one flat tensor: a view of a single weight (the record keeps
    the float one; a copy would hold every weight twice), concatenated where there are several."""
    if len(keys) == 1:
        return weights[keys[0]].reshape(-1)
    return torch.cat([weights[k].reshape(-1) for k in keys])


def weight_record(qmodule: nn.Module, fmodule: nn.Module) -> dict:
    """weight_sqnr plus the weight qparams (arrays when per-channel) of one layer."""
    qws, fws = quantized_weights(qmodule), float_weights(fmodule)
    common = [k for k in qws if k in fws]
    if not common:
        return {"weight_sqnr": math.nan}
    x, y = _flat(fws, common), _flat({k: _float(qws[k]) for k in common}, common)
    qw = qws[common[0]]
    # fp16 dynamic layers hand their weights back as float32: ask the module what it stores
    packed = getattr(qmodule, "_packed_params", None)
    dtype = getattr(qmodule, "dtype", None) or getattr(packed, "dtype", None) or qw.dtype
    rec = {"weight_sqnr": sqnr(x, y), "weight_dtype": str(dtype).replace("torch.", "")}
    if is_torchao_weight(qw):
        rec.update(_torchao_weight_info(qw))
        if getattr(qmodule, "simulated", ""):  # a number format whose kernels need a GPU
            rec["activation_mode"] += ", simulated"
    elif qw.is_quantized:
        scheme = qw.qscheme()
        rec["weight_qscheme"] = str(scheme).replace("torch.", "")
        if scheme in (torch.per_channel_affine, torch.per_channel_symmetric):
            rec["weight_scale"] = qw.q_per_channel_scales().double().numpy()
            rec["weight_zero_point"] = qw.q_per_channel_zero_points().double().numpy()
        else:
            rec["weight_scale"] = np.array([qw.q_scale()], dtype=np.float64)
            rec["weight_zero_point"] = np.array([qw.q_zero_point()], dtype=np.float64)
    else:
        rec["weight_qscheme"] = "none"
    rec["float_weight"] = x
    if common == ["weight"] and fws["weight"].dim() >= 2:  # per output channel, for diagnosis
        w = fws["weight"]
        inner = fmodule[0] if isinstance(fmodule, nn.Sequential) and len(fmodule) else fmodule
        axis = 1 if isinstance(inner, nn.modules.conv._ConvTransposeNd) else 0
        rec["channel_absmax"] = w.abs().transpose(0, axis).reshape(w.shape[axis], -1).amax(1).double().numpy()
    return rec


def _register(model: nn.Module, names: list[str], hook, handles: list) -> None:
    """Register into ``handles`` one by one (inside the caller's try: an interrupt between two
    registrations leaves none behind)."""
    for n in names:
        handles.append(model.get_submodule(n).register_forward_hook(hook(n)))


class Comparator:
    """Compares quantized models with one float reference on fixed evaluation batches.

    The reference's per-layer outputs are computed once and kept while they fit in
    ``cache_bytes`` (else recomputed on each comparison), so re-comparing after a plan change
    costs one quantized forward plus the shadow runs of the layers measured.
    """

    def __init__(self, reference: nn.Module, layers: list[str], batches: list, call=None,
                 cache_bytes: int = 512 * 2**20, output_fn=None):
        self.reference, self.layers, self.batches = reference, list(layers), list(batches)
        self.call = call or _run
        self.cache_bytes = cache_bytes
        self.output_fn = output_fn
        self.order: list[str] = []
        self._cache: list[tuple[dict, torch.Tensor, bool]] | None = None

    def _reference_outputs(self, i: int, batch) -> tuple[dict, torch.Tensor, bool]:
        """(layer -> reference output, model output, whether it is class scores) for batch ``i``,
        from the cache if held."""
        if self._cache is not None:
            return self._cache[i]
        outputs: dict[str, torch.Tensor] = {}

        def record(name):
            def hook(module, inputs, output):
                kept = _kept(output)
                if kept is not None:
                    outputs[name] = kept
                if name not in self.order:
                    self.order.append(name)
            return hook

        handles = []
        try:
            _register(self.reference, self.layers, record, handles)
            raw = self.call(self.reference, batch, i)
        finally:
            for h in handles:
                h.remove()
        final = model_output(raw, self.output_fn)
        # class scores: (batch, classes) or (batch, seq, vocab); of a mapping only its logits
        scores = (final.dim() in (2, 3) and final.shape[-1] > 1
                  and (self.output_fn is not None or not isinstance(raw, Mapping) or "logits" in raw))
        return outputs, final, scores

    def _fill_cache(self) -> None:
        entries, size = [], 0
        with torch.no_grad():
            for i, batch in enumerate(self.batches):
                entry = self._reference_outputs(i, batch)
                size += sum(t.nbytes for t in entry[0].values()) + entry[1].nbytes
                if size > self.cache_bytes:
                    return
                entries.append(entry)
        self._cache = entries

    def compare(self, quantized: nn.Module, measure: list[str] | None = None,
                hook_names: dict[str, str] | None = None) -> tuple[dict[str, dict], dict]:
        """Per-layer errors of the ``measure`` layers (default all) and model-level errors.

        ``hook_names`` maps a layer to the module of ``quantized`` to observe in its place.
        """
        if self._cache is None and not self.order:
            self._fill_cache()
        measure = self.layers if measure is None else list(measure)
        out_acc = {n: ErrorAccumulator() for n in measure}
        local_acc = {n: ErrorAccumulator() for n in measure}
        model_acc, agree, total = ErrorAccumulator(), 0, 0
        ref_out: dict[str, torch.Tensor] = {}

        def record_quantized(name):
            ref_module = self.reference.get_submodule(name)

            def hook(module, args, kwargs, output):
                y = choose_output(output)
                if y is None:
                    return
                y = _float(y)  # compared at once, before any in-place op downstream
                if name in ref_out:
                    out_acc[name].add(ref_out[name], y)
                shadow = ref_module(*map(_dequantized, args), **{k: _dequantized(v) for k, v in kwargs.items()})
                local_acc[name].add(_float(choose_output(shadow)), y)
            return hook

        hook_names = hook_names or {}
        handles = []
        try:
            for n in measure:
                handles.append(quantized.get_submodule(hook_names.get(n, n)).register_forward_hook(
                    record_quantized(n), with_kwargs=True))
            with torch.no_grad():
                for i, batch in enumerate(self.batches):
                    outputs, x, scores = self._reference_outputs(i, batch)
                    ref_out.clear()
                    ref_out.update(outputs)
                    y = model_output(self.call(quantized, batch, i), self.output_fn)
                    model_acc.add(x, y)
                    if scores:  # rows (or tokens) with NaN/Inf scores do not count
                        finite = torch.isfinite(x).all(-1) & torch.isfinite(y).all(-1)
                        agree += int((x.argmax(-1) == y.argmax(-1))[finite].sum())
                        total += int(finite.sum())
        finally:
            for h in handles:
                h.remove()
        per_layer = {}
        for n in measure:
            o, loc = out_acc[n].result(), local_acc[n].result()
            per_layer[n] = {
                "output_sqnr": o["sqnr"], "mse": o["mse"], "cosine": o["cosine"],
                "max_abs_err": o["max_abs_err"], "local_sqnr": loc["sqnr"],
            }
        model = model_acc.result()
        summary = {
            "output_sqnr": model["sqnr"],
            "output_mse": model["mse"],
            "top1_agreement": agree / total if total else math.nan,
        }
        self.order += [n for n in self.layers if n not in self.order]
        return per_layer, summary


class _ByteCounter(io.RawIOBase):
    """A write-only stream that counts what is written and keeps none of it."""

    def __init__(self):
        self.count = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        size = memoryview(data).nbytes
        self.count += size
        return size


def serialized_size(model: nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())``: what shipping the weights costs (counted as
    written, not held: a large model's bytes would be another copy of its weights)."""
    counter = _ByteCounter()
    torch.save(model.state_dict(), counter)
    return counter.count
