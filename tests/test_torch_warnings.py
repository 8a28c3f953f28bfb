"""qviz says once that torch.ao is deprecated, and only when a torch.ao flow ran."""

from __future__ import annotations

import warnings

import pytest

from qviz import torch_warnings
from qviz.torch_warnings import quiet_torch


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(torch_warnings, "_said", False)


def _caught(say: bool) -> list:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_torch(say_deprecation=say):
            warnings.warn("torch.ao.quantization is deprecated", DeprecationWarning, stacklevel=1)
    return [str(w.message) for w in caught]


def test_torch_warnings_inside_are_hidden_and_the_note_said_once(fresh):
    first, second = _caught(True), _caught(True)
    assert len(first) == 1 and "deprecated in favour of torchao" in first[0]
    assert second == []


def test_no_note_for_flows_that_are_not_torch_ao(fresh):
    assert _caught(False) == []
    assert not torch_warnings._said  # a later torch.ao flow still says it
