"""Quantization flows behind one protocol (:class:`qviz.flows.base.Flow`), found by name through
:mod:`qviz.flows.registry`: torch_ao/ (eager, fx, dynamic), pt2e/, torchao/."""
