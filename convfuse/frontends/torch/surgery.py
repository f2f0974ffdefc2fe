"""Tracing a module without changing it, and writing a fused graph back into the module.

What happens to a module convfuse changes (the README's "PyTorch modules" section says the same):

* **Surgery** (the module's own ``forward`` is kept): when every merge in a traced module is a
  straight line of layer calls (``self.bn(self.conv(x))``, each layer called once), the merged
  conv takes the place of the run's first layer and the other layers become ``nn.Identity``
  (a BatchNorm: :class:`FoldedBatchNorm`, which still reads as an identity BN for a model's own
  BN-folding method); a replaced layer's plain attributes (``m.f``, ``m.i``) carry over.
  The module keeps its class, attributes, methods, buffers and hooks; nothing else changes.
* **A generated forward**: where a merge needs new code (a sum of branches, a merged
  ``F.pad``/functional call), the module's ``forward`` is replaced by the fused graph's code on a
  subclass of the module's own class created for it (:func:`install_forward`), so
  ``isinstance`` checks, attributes, methods, buffers, hooks and the ``training`` flag stay as
  they were. Merged convs live at ``<common parent>_fused`` on that module; absorbed layers
  become ``nn.Identity``. The class pickles and deep-copies (the code is rebuilt from source,
  as ``torch.fx.GraphModule`` does). A forward that writes attributes is never replaced (the
  front end merges only straight runs there), since the generated code would not repeat them.

Tracing (:func:`trace_restoring`) snapshots every instance ``__dict__`` (parameters, buffers,
submodules and plain attributes, nested containers too) and restores it after
tracing, so a forward that writes ``self.mean = self.mean.type_as(x)`` never leaves an fx
``Proxy`` on the module; containers (lists, dicts, sets, plain objects' attributes) are restored
in place, nested up to ``_DEPTH`` levels; a Proxy stored deeper is a :class:`StoredProxyError`.
"""

from __future__ import annotations

import inspect
import operator
import types
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import fx, nn
from torch.fx.graph_module import _format_import_block, _forward_from_src, sys_importer

__all__ = [
    "HOOK_TABLES",
    "StoredProxyError",
    "has_hooks",
    "trace_restoring",
    "graph_module",
    "install_forward",
    "original_class",
    "generated_code",
    "get_path",
    "set_path",
    "replace_layer",
    "FoldedBatchNorm",
    "absorbed",
    "carry_attributes",
]

#: Per-module hook tables of ``nn.Module`` (forward, pre-forward and backward).
HOOK_TABLES = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
)


class StoredProxyError(RuntimeError):
    """Tracing left an fx Proxy inside a container attribute that cannot be restored."""


def has_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has its own forward, pre-forward or backward hooks."""
    return any(getattr(module, table, None) for table in HOOK_TABLES)


# --------------------------------------------------------------------------- tracing safely
#: How deep nested lists, dicts and sets of plain attributes are recorded and restored.
_DEPTH = 32


@dataclass
class _Snapshot:
    module: nn.Module
    state: dict[str, Any]  # the instance __dict__, shallow
    tables: dict[str, dict[str, Any]]  # _parameters, _buffers, _modules contents
    containers: dict[int, tuple[Any, Any, str]]  # id -> (list/dict/set, former contents, attribute)


def _record(value: Any, into: dict[int, tuple[Any, Any, str]], key: str, depth: int = 0) -> None:
    """The contents of every mutable container reachable from attribute ``key``'s ``value`` (not
    through modules or tensors), so that in-place writes (``self.cache["feats"].append(y)``,
    ``self.state.last = y``) can be seen and undone."""
    if depth > _DEPTH or id(value) in into or isinstance(value, (nn.Module, torch.Tensor)):
        return
    if isinstance(value, (list, dict, set)):
        into[id(value)] = (value, value.copy(), key)
    if isinstance(value, dict):
        children = list(value.values())
    elif isinstance(value, (list, tuple, set, frozenset)):
        children = list(value)
    elif _plain_object(value):
        children = [vars(value)]  # an object's own attributes (``self.state.last = y``)
    else:
        return
    for child in children:
        _record(child, into, key, depth + 1)


def _plain_object(value: Any) -> bool:
    """An instance of a user class with its own attribute dict (not a class, function, module)."""
    return hasattr(value, "__dict__") and not isinstance(
        value,
        (type, types.FunctionType, types.MethodType, types.BuiltinFunctionType, types.ModuleType, fx.Proxy),
    )


def _snapshot(root: nn.Module) -> list[_Snapshot]:
    snaps = []
    for m in root.modules():
        state = dict(m.__dict__)
        tables = {k: dict(v) for k, v in state.items() if k in ("_parameters", "_buffers", "_modules")}
        containers: dict[int, tuple[Any, Any, str]] = {}
        for k, v in state.items():
            if k not in tables:
                _record(v, containers, k)
        snaps.append(_Snapshot(m, state, tables, containers))
    return snaps


def _restore(snaps: list[_Snapshot]) -> None:
    for snap in snaps:
        m = snap.module
        m.__dict__.clear()
        m.__dict__.update(snap.state)
        for key, contents in snap.tables.items():
            table = m.__dict__[key]
            table.clear()
            table.update(contents)
        for container, contents, _ in snap.containers.values():
            if isinstance(container, list):
                container[:] = contents
            else:
                container.clear()
                container.update(contents)


def _holds_proxy(value: Any, depth: int = 0) -> bool:
    if isinstance(value, fx.Proxy):
        return True
    if depth > _DEPTH or isinstance(value, (nn.Module, torch.Tensor)):
        return False
    if isinstance(value, (list, tuple, set, frozenset)):
        return any(_holds_proxy(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return any(_holds_proxy(v, depth + 1) for v in value.values())
    if _plain_object(value):
        return _holds_proxy(vars(value), depth + 1)
    return False


def _written(snap: _Snapshot, skip: set[str]) -> list[str]:
    """Attributes of ``snap.module`` that tracing assigned (new or different objects)."""
    now = snap.module.__dict__
    out = [k for k, v in now.items() if k not in skip and (k not in snap.state or snap.state[k] is not v)]
    for table, saved in snap.tables.items():
        current = now.get(table, {})
        out += [k for k, v in current.items() if k not in skip and (k not in saved or saved[k] is not v)]
    for container, contents, key in snap.containers.values():
        if _changed(container, contents):
            out.append(f"{key} (in place)")
    return sorted(set(out) - set(snap.tables))


def _changed(container: Any, contents: Any) -> bool:
    """Whether a list, dict or set no longer holds the same objects as ``contents``."""
    if len(container) != len(contents):
        return True
    if isinstance(container, list):
        return any(a is not b for a, b in zip(container, contents))
    if isinstance(container, dict):
        return container.keys() != contents.keys() or any(container[k] is not contents[k] for k in contents)
    return {id(v) for v in container} != {id(v) for v in contents}


def trace_restoring(
    tracer: fx.Tracer, module: nn.Module
) -> tuple[fx.Graph, dict[str, Any], dict[str, list[str]]]:
    """``tracer.trace(module)`` with every module of ``module`` restored as it was afterwards.

    Returns the graph, the constants the tracer attached to the root (``_tensor_constant0``
    for a tensor the forward creates), which :func:`graph_module` needs, and the attributes each
    module's forward assigned while traced (by module path; a generated forward would not
    repeat those writes). Raises what tracing raises, or :class:`StoredProxyError` when a Proxy
    is still reachable from an attribute.
    """
    snaps = _snapshot(module)
    names = {id(m): name for name, m in module.named_modules()}
    before = snaps[0].state
    versions = _versions(module)
    extras: dict[str, Any] = {}
    writes: dict[str, list[str]] = {}
    try:
        graph = tracer.trace(module)
        for table in ("_parameters", "_buffers"):
            extras.update(
                {k: v for k, v in module.__dict__[table].items() if k not in snaps[0].tables[table]}
            )
        extras.update({k: v for k, v in module.__dict__.items() if k not in before})
        for snap in snaps:
            written = _written(snap, set(extras) if snap is snaps[0] else set())
            if written:
                writes[names.get(id(snap.module), "?")] = written
        for path, keys in _versions_changed(module, versions).items():
            writes[path] = sorted(set(writes.get(path, [])) | {f"{k} (in place)" for k in keys})
    finally:
        _restore(snaps)
    for m in module.modules():
        for key, value in m.__dict__.items():
            if _holds_proxy(value):
                raise StoredProxyError(
                    f"its forward stores a traced value inside {type(m).__name__}.{key}, "
                    "which convfuse cannot restore"
                )
    return graph, extras, writes


def _versions(module: nn.Module) -> dict[int, int]:
    """The version counter of every parameter and buffer (in-place writes bump it)."""
    return {
        id(t): t._version
        for m in module.modules()
        for t in [*m._parameters.values(), *m._buffers.values()]
        if t is not None
    }


def _versions_changed(module: nn.Module, versions: dict[int, int]) -> dict[str, list[str]]:
    """Parameters and buffers written in place while tracing, by module path: fx runs an in-place
    op on a buffer (``self.count.add_(1)``) eagerly without recording it, so only the counter
    shows that the forward updates it."""
    out: dict[str, list[str]] = {}
    for path, m in module.named_modules():
        for table in (m._parameters, m._buffers):
            for key, t in table.items():
                if t is not None and id(t) in versions and t._version != versions[id(t)]:
                    out.setdefault(path, []).append(key)
    return out


def graph_module(module: nn.Module, graph: fx.Graph, extras: dict[str, Any], name: str) -> fx.GraphModule:
    """A scratch GraphModule over ``graph`` that shares ``module``'s layers and tensors (its
    intermediate containers are plain ``nn.Module`` shells, so fusing it never touches
    ``module``)."""
    root: dict[str, Any] = {}
    for node in graph.nodes:
        if node.op in ("get_attr", "call_module") and node.target not in root:
            root[node.target] = (
                extras[node.target] if node.target in extras else get_path(module, node.target)
            )
    return fx.GraphModule(root, graph, name)


# --------------------------------------------------------------------------- paths
def get_path(root: nn.Module, target: str) -> Any:
    """The attribute at dotted ``target`` under ``root`` (``root`` itself for ``""``)."""
    return operator.attrgetter(target)(root) if target else root


def set_path(root: nn.Module, target: str, value: nn.Module) -> None:
    """Put ``value`` at dotted ``target`` under ``root`` (the parent must exist)."""
    owner, _, leaf = target.rpartition(".")
    setattr(get_path(root, owner), leaf, value)


def replace_layer(root: nn.Module, target: str, value: nn.Module) -> None:
    """Put ``value`` in place of the layer at ``target``, carrying the plain attributes the
    model gave that layer (``m.f``, ``m.i`` of a routing parent) over to it."""
    try:
        old = get_path(root, target)
    except AttributeError:
        old = None
    if isinstance(old, nn.Module):
        carry_attributes(old, value)
    set_path(root, target, value)


class FoldedBatchNorm(nn.Identity):
    """What stands where a BatchNorm was folded into a conv: the identity map, which also reads
    as an identity BatchNorm (weight 1, bias 0, mean 0, variance 1, eps 0; computed, never
    stored), so a model's own BN-folding method (``m.conv = fuse_conv_and_bn(m.conv, m.bn)``)
    still works after convfuse and folds nothing more. Not a ``_BatchNorm``: no statistics left."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        ref = next(
            (t for t in (getattr(bn, k, None) for k in ("running_mean", "weight")) if t is not None), None
        )
        self.num_features = bn.num_features
        self.eps = 0.0
        self.momentum = bn.momentum
        self.affine = True
        self.track_running_stats = True
        like = torch.empty(0) if ref is None else torch.empty(0, dtype=ref.dtype, device=ref.device)
        self.register_buffer("_like", like, persistent=False)  # follows .to(); not in state_dict

    def _full(self, value: float) -> torch.Tensor:
        # a buffer registered in __init__; Module.__getattr__ is typed Tensor | Module (and a class
        # annotation would make torch.jit.script look the attribute up as a declared one)
        like = cast(torch.Tensor, self._like)
        return torch.full((self.num_features,), value, dtype=like.dtype, device=like.device)

    __jit_unused_properties__ = ["weight", "bias", "running_mean", "running_var"]  # noqa: RUF012

    @property
    def weight(self) -> torch.Tensor:
        return self._full(1.0)

    @property
    def bias(self) -> torch.Tensor:
        return self._full(0.0)

    @property
    def running_mean(self) -> torch.Tensor:
        return self._full(0.0)

    @property
    def running_var(self) -> torch.Tensor:
        return self._full(1.0)

    def extra_repr(self) -> str:
        return f"{self.num_features} (folded)"


def absorbed(layer: nn.Module) -> nn.Module:
    """The placeholder for a layer merged into another: ``nn.Identity``, or for a BatchNorm a
    :class:`FoldedBatchNorm`."""
    if isinstance(layer, nn.modules.batchnorm._BatchNorm):
        return FoldedBatchNorm(layer)
    return nn.Identity()


def carry_attributes(old: nn.Module, new: nn.Module) -> None:
    """Copy to ``new`` the public plain attributes of ``old`` that its class does not set itself
    (not ``nn.Module`` state, not an argument of a torch layer's ``__init__``)."""
    if type(old).__module__.startswith("torch."):
        try:
            own = set(inspect.signature(type(old).__init__).parameters)
        except (TypeError, ValueError):
            own = set()
    else:
        own = set()
    for key, value in old.__dict__.items():
        if key.startswith("_") or key in own or key == "training" or key in new.__dict__:
            continue
        if isinstance(value, (nn.Module, nn.Parameter)):
            continue
        new.__dict__[key] = value


# --------------------------------------------------------------------------- generated forward
_BASE = "_convfuse_base"
_CODE = "_convfuse_code"
_CLASSES: dict[tuple[type[nn.Module], str], type[nn.Module]] = {}


class _Code:
    """``module.code``: the generated forward's source, as ``GraphModule.code`` gives it. A
    non-data descriptor, so an instance attribute named ``code`` still wins."""

    def __get__(self, obj: Any, cls: type) -> str:
        return generated_code(cls) or ""


def _fused_class(base: type[nn.Module], code: str) -> type[nn.Module]:
    """The subclass of ``base`` whose forward is ``code`` (one class per base and code)."""
    key = (base, code)
    cls = _CLASSES.get(key)
    if cls is None:
        forward = _forward_from_src(code, {})
        namespace = {
            "forward": forward,
            "__module__": base.__module__,
            "__qualname__": base.__qualname__,
            "__doc__": base.__doc__,
            "__reduce_ex__": _reduce_ex,
            _BASE: base,
            _CODE: code,
        }
        if not hasattr(base, "code"):
            namespace["code"] = _Code()
        # three-argument type() of a Module subclass is one; mypy types it as a plain ``type``
        cls = cast("type[nn.Module]", type(base.__name__, (base,), namespace))
        _CLASSES[key] = cls
    return cls


def generated_code(module: nn.Module | type) -> str | None:
    """The source of the forward convfuse generated for ``module`` (or its class), else None."""
    cls = module if isinstance(module, type) else type(module)
    return cls.__dict__.get(_CODE)


def _reduce_ex(self: nn.Module, protocol: int) -> tuple[Any, ...]:
    cls = type(self)
    return (_new_fused, (getattr(cls, _BASE), getattr(cls, _CODE)), self.__dict__.copy())


def _new_fused(base: type[nn.Module], code: str) -> nn.Module:
    """An empty instance of the fused subclass (pickle and deepcopy fill in its state)."""
    cls = _fused_class(base, code)
    return cls.__new__(cls)


def original_class(module: nn.Module) -> type[nn.Module]:
    """The class ``module`` had before convfuse gave it a generated forward."""
    return getattr(type(module), _BASE, type(module))


def install_forward(module: nn.Module, graph: fx.Graph) -> None:
    """Give ``module`` the forward ``graph`` computes (targets relative to ``module``), keeping
    its instance state and subclassing its own class (a ``GraphModule`` simply takes the new
    graph, and stays a GraphModule)."""
    if isinstance(module, fx.GraphModule):
        module.graph = graph  # the setter takes ownership and recompiles
        return
    python = graph.python_code(root_module="self")
    code = _format_import_block(python.globals, sys_importer) + python.src
    module.__class__ = _fused_class(original_class(module), code)
