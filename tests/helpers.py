"""Shared test helpers: snapshots that prove a model was left exactly as it was."""

from __future__ import annotations

import torch
from torch import nn


def model_snapshot(model: nn.Module) -> dict:
    """Parameters and buffers (cloned), hook counts and training flags of every module."""
    hooks = {}
    for name, m in model.named_modules():
        hooks[name] = tuple(
            len(getattr(m, attr))
            for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_state_dict_hooks")
        )
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()
                  if isinstance(v, torch.Tensor)},
        "hooks": hooks,
        "training": {name: m.training for name, m in model.named_modules()},
        "types": {name: type(m) for name, m in model.named_modules()},
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = model_snapshot(model)
    assert after["types"] == before["types"], "modules were replaced"
    assert after["training"] == before["training"], "training flags changed"
    assert after["hooks"] == before["hooks"], "hooks were left behind"
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        new = after["state"][key]
        assert new.dtype == value.dtype and new.shape == value.shape, key
        assert torch.equal(new, value) or (value.is_floating_point() and torch.equal(new.isnan(), value.isnan()) and torch.equal(new.nan_to_num(), value.nan_to_num())), key
