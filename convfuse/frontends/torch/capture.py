"""Capturing a module's graph where torch.fx's symbolic tracing stops (issue 16).

Symbolic tracing fails on two things public re-parameterizable blocks do: control flow on module
state (``device = self.k0.get_device(); if device < 0: ...`` in a ``rep_params()`` called by
``forward``, ``for i in range(len(self.branches))`` over a traced list) and item assignment
(``y[:, :, 0:1, :] = b``: ``'Proxy' object does not support item assignment``).
:class:`CaptureMixin`, mixed into the front end's tracer, traces the same way and in addition

* records item assignment as ``operator.setitem`` (an in-place write, as torch runs it);
* evaluates every node that reads **only module state** (parameters, buffers, constants the
  forward creates; never an input) on private copies of those tensors while tracing, and answers
  ``bool``, ``len``, ``int``/``index`` and iteration on such values with their actual values: the
  branch taken is the one every call takes, since nothing it depends on comes from the input.

What it refuses, as symbolic tracing does (the module is then ``untraceable``): a decision on a
value computed from an input, **including its shape** (``if x.shape[-1] > 32``). A branch on
the input's shape would be fixed at the traced size in a generated forward, and even surgery
under it is unsafe (merging the layers of the branch taken at one size changes what another
size computes), while the self-check sees one size only. ``torch.export`` and tracing with real
example inputs bake such branches the same way, so they are not used.

The graph is the fx graph the front end reads everywhere else (module calls, ``nn_module_stack``
scopes, the same importer and planner); the parameter-only computation in it is then folded by
:mod:`.fold` and bias-filled borders read by :mod:`.fill`.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import IntEnum
from typing import Any

import torch
from torch import fx
from torch.fx.node import map_arg
from torch.utils._pytree import tree_flatten

__all__ = [
    "MISSING",
    "Taint",
    "CaptureMixin",
    "evaluate",
    "is_metadata_read",
    "node_taint",
    "raw_attribute",
    "state_copy",
]

MISSING: Any = object()  # a node whose value capture does not know (it reads an input)


class Taint(IntEnum):
    """What a node's value depends on: module state only, the input's shape, the input's values."""

    STATE = 0
    SHAPE = 1
    INPUT = 2


_META_ATTRS = frozenset({"shape", "dtype", "device", "ndim", "is_cuda", "layout", "is_sparse"})
_META_METHODS = frozenset({"size", "dim", "ndimension", "get_device", "numel", "nelement"})


def is_metadata_read(node: fx.Node) -> bool:
    """``t.shape``, ``t.size()``, ``t.dim()``, ``t.device``...: reads what a tensor is, not its values."""
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) == 2 and node.args[1] in _META_ATTRS
    if node.op == "call_function" and node.target is len:
        return True
    return node.op == "call_method" and node.target in _META_METHODS


def node_taint(node: fx.Node, taints: dict[fx.Node, Taint]) -> Taint:
    """The taint of ``node`` from its arguments' (``taints``): a placeholder or a module call is
    input (a layer is never evaluated here), an attribute is state, a metadata read of an input is
    its shape."""
    if node.op in ("placeholder", "call_module", "output"):
        return Taint.INPUT
    if node.op == "get_attr":
        return Taint.STATE
    inputs = [taints.get(a, Taint.INPUT) for a in node.all_input_nodes]
    worst = max(inputs, default=Taint.STATE)
    if worst is Taint.INPUT and is_metadata_read(node):
        return Taint.SHAPE
    return worst


class CaptureMixin:
    """A :class:`torch.fx.Tracer` mixin: item assignment recorded, decisions on module state
    answered with their values (module docstring). ``decisions`` lists the state-dependent
    decisions taken (for the report)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.values: dict[fx.Node, Any] = {}
        self.taints: dict[fx.Node, Taint] = {}
        self.decisions: list[str] = []
        self._attrs: dict[str, Any] = {}

    # ------------------------------------------------------------------ values
    def create_node(
        self, kind: str, target: Any, args: Any, kwargs: Any, name: Any = None, type_expr: Any = None
    ) -> fx.Node:
        node = super().create_node(kind, target, args, kwargs, name, type_expr)  # type: ignore[misc]
        self.taints[node] = node_taint(node, self.taints)
        self.values[node] = self._evaluate(node) if self.taints[node] is Taint.STATE else MISSING
        return node

    def _evaluate(self, node: fx.Node) -> Any:
        return evaluate(node, self.values, lambda t: state_copy(self.root, t, self._attrs))  # type: ignore[attr-defined]

    def _known(self, obj: fx.Proxy, what: str) -> Any:
        """The value of ``obj`` for a Python decision, or the tracing error symbolic tracing raises."""
        node = obj.node
        value = self.values.get(node, MISSING)
        taint = self.taints.get(node, Taint.INPUT)
        if value is MISSING or taint is not Taint.STATE:
            source = "the input's shape" if taint is Taint.SHAPE else "the input"
            raise fx.proxy.TraceError(
                f"{what} on {node.name}, which depends on {source} "
                "(convfuse fixes decisions on module state only)"
            )
        self.decisions.append(f"{what} {node.name}")
        return value

    # ------------------------------------------------------------------ tracer hooks
    def to_bool(self, obj: fx.Proxy) -> bool:
        return bool(self._known(obj, "branch"))

    def iter(self, obj: fx.Proxy) -> Iterator:
        value = self._known(obj, "iteration")
        return iter([obj[i] for i in range(len(value))])  # type: ignore[index]

    def trace(self, root: Any, concrete_args: Any = None) -> fx.Graph:
        with _proxy_methods():
            return super().trace(root, concrete_args)  # type: ignore[misc]


def state_copy(root: Any, target: str, copies: dict[str, Any]) -> Any:
    """A private copy of the tensor at ``target`` under ``root``, one per target in ``copies`` (so
    in-place writes to a constant the forward creates are seen by its later reads, never by the
    module)."""
    if target not in copies:
        value = raw_attribute(root, target)
        copies[target] = value.detach().clone() if isinstance(value, torch.Tensor) else value
    return copies[target]


def evaluate(node: fx.Node, values: dict[fx.Node, Any], attr: Callable[[str], Any]) -> Any:
    """The value of a state-only ``node`` from its arguments' ``values`` (``attr`` gives a get_attr
    target's), without gradients; MISSING when an argument is unknown or the call raises."""
    if node.op == "get_attr":
        return attr(str(node.target))
    args = map_arg(node.args, lambda n: values.get(n, MISSING))
    kwargs = map_arg(node.kwargs, lambda n: values.get(n, MISSING))
    if any(v is MISSING for v in tree_flatten((args, kwargs))[0]):
        return MISSING
    try:
        with torch.no_grad():
            if node.op == "call_function":
                return node.target(*args, **kwargs)  # type: ignore[operator]
            if node.op == "call_method":
                return getattr(args[0], str(node.target))(*args[1:], **kwargs)
    except Exception:  # noqa: BLE001 - unknown value: not decided on, not folded
        return MISSING
    return MISSING


def raw_attribute(root: Any, target: str) -> Any:
    """The object at dotted ``target`` under ``root`` read from the instance tables, not through
    ``nn.Module.__getattr__`` (which fx patches while tracing); MISSING when absent."""
    obj = root
    for part in target.split("."):
        found = MISSING
        state = getattr(obj, "__dict__", {})
        for table in ("_parameters", "_buffers", "_modules"):
            if part in state.get(table, {}):
                found = state[table][part]
                break
        else:
            if part in state:
                found = state[part]
            else:
                try:
                    found = object.__getattribute__(obj, part)  # a property (a parametrized weight)
                except AttributeError:
                    return MISSING
        obj = found
    return obj


# --------------------------------------------------------------------------- Proxy methods
def _setitem(self: fx.Proxy, key: Any, value: Any) -> None:
    self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})


def _len(self: fx.Proxy) -> int:
    tracer = self.tracer
    if isinstance(tracer, CaptureMixin):
        return len(tracer._known(self, "len()"))
    return _ORIGINAL_LEN(self)


def _index(self: fx.Proxy) -> int:
    tracer = self.tracer
    if isinstance(tracer, CaptureMixin):
        return operator.index(tracer._known(self, "int()"))
    raise TypeError("a traced value cannot be used as an int")


_ORIGINAL_LEN = fx.Proxy.__len__


@contextmanager
def _proxy_methods() -> Iterator[None]:
    """``fx.Proxy`` with item assignment, ``len`` and ``int``/``index`` for the duration (the
    added methods act only for a capture tracer's proxies; ``len`` falls back to fx's error)."""
    added = {"__setitem__": _setitem, "__index__": _index, "__int__": _index}
    saved = {k: fx.Proxy.__dict__[k] for k in added if k in fx.Proxy.__dict__}
    for k, v in added.items():
        setattr(fx.Proxy, k, v)
    fx.Proxy.__len__ = _len  # type: ignore[method-assign]
    try:
        yield
    finally:
        fx.Proxy.__len__ = _ORIGINAL_LEN  # type: ignore[method-assign]
        for k in added:
            if k in saved:
                setattr(fx.Proxy, k, saved[k])
            else:
                delattr(fx.Proxy, k)
