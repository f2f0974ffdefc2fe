"""One traced graph fused: its linear nodes imported to the planner's IR (:mod:`.importer`;
:mod:`.rules` says which layers and calls are linear), :func:`convfuse.planner.plan` called,
the plan written back as fx nodes, and the nodes left unmerged explained.

Real-world forms (timm): a layer subclass with its own forward is traced through (its
``F.batch_norm`` / ``F.conv2d`` call is read), rank reads (``x.ndim``, ``x.dim()``,
``len(x.shape)``) do not count as uses of a tensor and move to the region's input when the
tensor disappears (so ``torch._assert(x.ndim == 4)`` keeps checking the same rank), while reads
of the full shape keep the tensor and are reported; in-place sums on a fresh tensor are read
as sums and restored when they do not merge.
"""

from __future__ import annotations

import inspect
import operator
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import fx
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from ...decline import Decline, Reason
from ...ir import REGROUP, LinearGraph, LinearNode, OpKind
from ...planner import Merge, Plan, Resum, plan
from .context import _CONV, _Context, _join, _named_sources
from .export import layer_from_merge
from .importer import op_node, parameter_sizes
from .layers import layer_types
from .ops import ConvOp, IdentityOp, LinearOp, numpy_dtype, weight_dtype_device
from .rules import UNKNOWN, Cat, Terms, Unary, call_op, module_op

_CONST_METHODS = {"view", "reshape", "unsqueeze", "squeeze", "detach", "contiguous", "flatten"}


_CONST_FUNCTIONS = {operator.getitem, torch.reshape, torch.unsqueeze, torch.squeeze, torch.flatten}


_VIEW_METHODS = {"view", "reshape", "unsqueeze", "squeeze", "flatten", "transpose", "permute", "narrow",
                 "select", "expand", "as_strided", "detach", "contiguous", "view_as", "unflatten",
                 "t"}  # fmt: skip


_VIEW_FUNCTIONS = {operator.getitem, torch.reshape, torch.unsqueeze, torch.squeeze, torch.flatten,
                   torch.transpose, torch.permute, torch.narrow, torch.select, torch.detach}  # fmt: skip


def _is_view(node: fx.Node) -> bool:
    """Whether ``node`` may return a view sharing memory with its input."""
    if node.op == "call_method":
        return node.target in _VIEW_METHODS
    return node.op == "call_function" and node.target in _VIEW_FUNCTIONS


_INPLACE_FUNCTIONS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.setitem}


def _target_name(node: fx.Node) -> str:
    """The target of a ``call_method``, ``call_module`` or ``get_attr`` node: a name (fx types
    every target as ``Callable | str``)."""
    return cast(str, node.target)


def _function(node: fx.Node) -> Callable[..., Any]:
    """The target of a ``call_function`` node: a callable (fx types it as ``Callable | str``)."""
    return cast(Callable[..., Any], node.target)


def _is_inplace(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether ``node`` may write into a tensor it reads."""
    if node.op == "call_method":
        return _target_name(node).endswith("_") and not _target_name(node).endswith("__")
    if node.op == "call_module":
        return bool(getattr(gm.get_submodule(_target_name(node)), "inplace", False))
    if node.op != "call_function":
        return False
    name = getattr(node.target, "__name__", "")
    if node.target in _INPLACE_FUNCTIONS or (name.endswith("_") and not name.endswith("__")):
        return True
    try:
        bound = inspect.signature(_function(node)).bind_partial(*node.args, **node.kwargs).arguments
    except (TypeError, ValueError):
        return bool(node.kwargs.get("inplace"))
    return bool(bound.get("inplace"))


_INPLACE_SUM_FUNCTIONS = {operator.iadd: operator.add, operator.isub: operator.sub,
                          operator.imul: operator.mul, operator.itruediv: operator.truediv}  # fmt: skip


_INPLACE_SUM_METHODS = {"add_": "add", "sub_": "sub", "mul_": "mul", "div_": "div"}


def _functional_form(node: fx.Node) -> Any:
    """The out-of-place target of an in-place sum or scaling (``t += u``, ``t.add_(u)``), or None."""
    if node.op == "call_method":
        return _INPLACE_SUM_METHODS.get(_target_name(node))
    if node.op == "call_function":
        try:
            return _INPLACE_SUM_FUNCTIONS.get(_function(node))
        except TypeError:  # unhashable target
            return None
    return None


def _shape_read(node: fx.Node) -> str:
    """``".shape"`` / ``".size()"`` / ``".numel()"`` when ``node`` reads a tensor's shape, else ``""``."""
    if node.op == "call_function" and node.target is getattr and node.args[1:] == ("shape",):
        return ".shape"
    if node.op == "call_method" and node.target in ("size", "numel", "nelement"):
        return f".{node.target}()"
    return ""


def _qualified(target: Any) -> str:
    """``torch.nn.functional.batch_norm``, ``torch.tanh``, ``operator.add``: a called function
    by the public name a reader knows."""
    name = getattr(target, "__name__", None) or repr(target)
    for where, namespace in (("torch", torch), ("torch.nn.functional", F), ("operator", operator)):
        if getattr(namespace, name, None) is target:
            return f"{where}.{name}"
    module = getattr(target, "__module__", None) or ""
    qualname = getattr(target, "__qualname__", None) or name
    return f"{module}.{qualname}" if module and module != "builtins" else qualname


class _GraphFuser:
    """Find maximal linear regions of a traced graph, reduce them, write them back."""

    def __init__(
        self,
        gm: fx.GraphModule,
        prefix: str,
        ctx: _Context,
        inputs: tuple[Any, ...] | None,
        straight_only: str = "",
        aliased: frozenset[str] = frozenset(),
    ) -> None:
        self.gm = gm
        self.aliased = aliased  # layer paths that share their module with another path
        self.straight_only = straight_only  # why only straight runs may merge here ("" : anything may)
        self.declined_children: set[str] = set()  # children holding a merge declined for that
        self.graph = gm.graph
        self.prefix = prefix
        self.ctx = ctx
        self.entries: dict[fx.Node, Unary | Terms] = {}
        self.nodes = list(self.graph.nodes)
        self.order = {n: i for i, n in enumerate(self.nodes)}
        self.module_names: set[str] = set()
        self.shared_reported: set[fx.Node] = set()
        self.owners: dict[str, list[str]] = {}  # function-call name -> path of the module it runs in
        self.functionalized: dict[fx.Node, Any] = {}  # in-place sum -> its original target
        self.changed = False
        self._const_cache: dict[fx.Node, Any] = {}
        self.calls = Counter(n.target for n in self.nodes if n.op == "call_module")
        self.attr_owners = {  # modules whose tensors the graph reads directly
            ".".join(n.target.split(".")[:k]) for n in self.nodes if n.op == "get_attr"
            for k in range(1, n.target.count(".") + 1)
        }  # fmt: skip
        self.rewrites: list[tuple[bool, str]] = []  # (a straight run of layer calls, scope) per merge
        self.dropped: list[str] = []  # attributes only the merged layers read
        self.target_of: dict[str, str] = {}  # layer name -> call_module target
        args = ctx.shapes.get(prefix) if inputs is None and prefix else None
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        if args is not None and len(args) == len(placeholders):
            # A nested module under the latency policy: its recorded input shapes, as zeros.
            inputs = tuple(torch.zeros(shape, dtype=dtype) for shape, dtype in args)
        if inputs is not None:
            try:
                ShapeProp(gm).propagate(*inputs)
            except Exception as exc:  # noqa: BLE001 - shapes are optional
                if not ctx.inferred:  # the user's inputs (an inferred one is only a guess)
                    ctx.report.notes.append(f"shape propagation failed ({exc}); shapes inferred from layers")

    # ------------------------------------------------------------------ constants
    def _const(self, node: fx.Node) -> Any:
        """The value of a node computed from attributes only, else UNKNOWN."""
        if node in self._const_cache:
            return self._const_cache[node]
        value: Any = UNKNOWN
        if node.op == "get_attr":
            try:
                value = operator.attrgetter(_target_name(node))(self.gm)
            except AttributeError:
                value = UNKNOWN
            if not isinstance(value, torch.Tensor):
                value = UNKNOWN
        elif (node.op == "call_method" and node.target in _CONST_METHODS) or (
            node.op == "call_function" and node.target in _CONST_FUNCTIONS
        ):
            args = [self._const(a) if isinstance(a, fx.Node) else a for a in node.args]
            if all(a is not UNKNOWN for a in args) and not any(
                isinstance(v, fx.Node) for v in node.kwargs.values()
            ):
                try:
                    if node.op == "call_method":
                        value = getattr(args[0], _target_name(node))(*args[1:], **node.kwargs)
                    else:
                        value = _function(node)(*args, **node.kwargs)
                except Exception:  # noqa: BLE001 - not a constant we can evaluate
                    value = UNKNOWN
                if not isinstance(value, torch.Tensor):
                    value = UNKNOWN
        self._const_cache[node] = value
        return value

    def _resolve(self, arg: Any) -> Any:
        if isinstance(arg, fx.Node):
            value = self._const(arg)
            return arg if value is UNKNOWN else value
        if isinstance(arg, (int, float)) and not isinstance(arg, bool):
            return arg
        return UNKNOWN

    # ------------------------------------------------------------------ IR
    def _name(self, target: str) -> str:
        return _join(self.prefix, target)

    def _build(self) -> None:
        """Read every node as a linear op, a sum, or a reason; in-place sums become sums first."""
        declined = self._classify()
        if self._functionalize():
            declined = self._classify()
        for node, decline in declined.items():
            near = list(node.all_input_nodes) + list(node.users)
            if any(n in self.entries for n in near):
                self.ctx.report.declined((self._node_name(node),), decline)

    def _classify(self) -> dict[fx.Node, Decline]:
        """Fill ``entries``; return the nodes whose rule declined."""
        self.entries = {}
        declined: dict[fx.Node, Decline] = {}
        for node in self.nodes:
            entry: Any = None
            if node.op == "call_module":
                module = self.gm.get_submodule(node.target)
                if len(node.args) == 1 and not node.kwargs and isinstance(node.args[0], fx.Node):
                    op = module_op(module, self._name(node.target))
                    entry = Unary(op, node.args[0]) if isinstance(op, LinearOp) else op
                    self.module_names.add(self._name(node.target))
                    self.target_of[self._name(node.target)] = node.target
                if isinstance(module, _CONV):
                    self.ctx.seen.add(self._name(node.target))
            elif node.op in ("call_function", "call_method"):
                entry = call_op(node, self._resolve)
                if isinstance(entry, Unary):
                    entry.op.name = self._node_name(node)
            if isinstance(entry, Decline):
                declined[node] = entry
            elif entry is not None:
                if isinstance(entry, Unary):
                    entry.op.origin = node
                self.entries[node] = entry
        return declined

    def _node_name(self, node: fx.Node) -> str:
        """A module call by its path; a function call inside a traced-through module as
        ``<module path>:<node>`` (``conv_1x1.bn:batch_norm_1``), else by its node name."""
        if node.op == "call_module":
            return self._name(_target_name(node))
        stack = node.meta.get("nn_module_stack") or {}
        owner = str(list(stack.values())[-1][0]) if stack else ""
        path = _join(self.prefix, owner)
        if not path or node.op not in ("call_function", "call_method"):
            return node.name
        name = f"{path}:{node.name}"
        self.owners[name] = owner.split(".") if owner else []
        return name

    # ------------------------------------------------------------------ in-place sums
    def _fresh(self, node: fx.Node) -> bool:
        """Whether ``node`` surely returns a new tensor (not its input or a view of it)."""
        if node in self.functionalized:
            return True
        entry = self.entries.get(node)
        if isinstance(entry, (Terms, Cat)):
            return True
        return isinstance(entry, Unary) and not isinstance(entry.op, IdentityOp) and not _is_view(node)

    def _functionalize(self) -> bool:
        """Read in-place sums (``t.add_(u)``, ``operator.iadd``; also ``sub_``/``mul_``/``div_``) as
        their out-of-place forms when that is safe, so they can join a linear region.

        Safe when ``t`` is a new tensor (a conv, BN, sum... output: nothing else shares its memory)
        and nothing read ``t`` before the write except its rank (so no earlier alias sees the
        write); later readers of ``t`` are pointed at the sum, which holds the same values. A
        rewritten node that does not end up merged is turned back into its in-place form.
        """
        for node in self.nodes:
            functional = _functional_form(node)
            if functional is None:
                continue
            target = node.args[0] if node.args else None
            if not isinstance(target, fx.Node):
                node.target = functional  # ``0 += t``: nothing is written in place
                continue
            earlier = [u for u in target.users if u is not node and self.order[u] < self.order[node]]
            if not self._fresh(target) or any(not self._rank_read(u) for u in earlier):
                continue
            self.functionalized[node] = node.target
            node.target = functional
            for user in list(target.users):
                if user is not node and self.order[user] > self.order[node]:
                    user.replace_input_with(target, node)
        return bool(self.functionalized)

    def _restore_inplace(self) -> None:
        """Functionalized sums left in the graph go back to their in-place form (dtype and
        aliasing exactly as the model wrote them)."""
        for node, target in self.functionalized.items():
            if not getattr(node, "_erased", False):
                node.target = target

    # ------------------------------------------------------------------ shape reads
    def _rank_read(self, node: fx.Node) -> bool:
        """``t.ndim``, ``t.dim()``, ``len(t.shape)``: reads only the rank, which every op of a
        linear region keeps, so the read can move to the region's input."""
        if not node.args or not isinstance(node.args[0], fx.Node):
            return False
        if node.op == "call_function" and node.target is getattr and node.args[1:] == ("ndim",):
            return True
        if node.op == "call_method" and node.target in ("dim", "ndimension") and len(node.args) == 1:
            return True
        read = _shape_read(node)
        if read == ".shape" or (read == ".size()" and len(node.args) == 1 and not node.kwargs):
            return all(u.op == "call_function" and u.target is len for u in node.users)
        return False

    def _users(self, node: fx.Node) -> list[fx.Node]:
        """Users of ``node`` that read its values (rank reads left out)."""
        return [u for u in node.users if not self._rank_read(u)]

    def _anchor(self, node: fx.Node, nodes: set[fx.Node]) -> fx.Node:
        """The tensor outside ``nodes`` that ``node`` was computed from (same rank)."""
        while node in nodes:
            entry = self.entries[node]
            if isinstance(entry, Unary):
                node = entry.input
            else:
                node = entry.terms[0][0] if isinstance(entry, Terms) else entry.inputs[0]
        return node

    def _move_rank_reads(self, nodes: set[fx.Node], root: fx.Node) -> None:
        """Point rank reads of tensors about to disappear at the region's input (same rank)."""
        for node in nodes:
            if node is root:
                continue
            for user in list(node.users):
                if self._rank_read(user):
                    user.replace_input_with(node, self._anchor(node, nodes))

    # ------------------------------------------------------------------ regions
    def _decline_new_code(self, names: tuple[str, ...], nodes: Iterable[fx.Node]) -> None:
        """Straight runs only here: decline a merge that needs new code, and remember the
        children it lies in (each is fused on its own afterwards)."""
        for node in nodes:
            stack = [path for path, _ in (node.meta.get("nn_module_stack") or {}).values()]
            if node.op == "call_module" and stack and stack[-1] == node.target:
                stack = stack[:-1]
            if stack:
                self.declined_children.add(stack[0])
        where = self.prefix or type(self.gm).__name__
        self.ctx.report.declined(
            names,
            Decline(
                Reason.UNSUPPORTED,
                f"merging this needs a new forward for {where}, but the forward it would replace writes "
                f"attributes ({self.straight_only}), which a generated forward would not repeat",
            ),
        )

    @property
    def straight(self) -> bool:
        """Every merge replaced a straight run of layer calls: surgery keeps the forward."""
        return all(straight for straight, _ in self.rewrites)

    def inner_scopes(self) -> list[str]:
        """The children (outermost paths) whose own forwards hold a merge that needs new code."""
        scopes = sorted({scope for straight, scope in self.rewrites if not straight} - {""})
        return [s for s in scopes if not any(s.startswith(o + ".") for o in scopes)]

    def _scope(self, nodes: Iterable[fx.Node]) -> str:
        """The innermost module whose forward computes all of ``nodes`` ("" for this one)."""
        common: list[str] | None = None
        for node in nodes:
            stack = [path for path, _ in (node.meta.get("nn_module_stack") or {}).values()]
            if node.op == "call_module" and stack and stack[-1] == node.target:
                stack = stack[:-1]
            if common is None:
                common = stack
            else:
                k = 0
                while k < min(len(common), len(stack)) and common[k] == stack[k]:
                    k += 1
                common = common[:k]
        return common[-1] if common else ""

    def _is_straight(self, merge: Merge) -> bool:
        """Whether ``merge`` replaces layer calls one after another from its input (each layer
        called once in the graph, its tensors not read directly), so that the merged layer in its
        first layer's place, ``nn.Identity`` in the others, computes it with the module's own
        forward."""
        prev = self.by_name.get(merge.x)
        for node in sorted((n.origin for n in merge.nodes), key=self.order.__getitem__):
            if node.op != "call_module" or self.calls[node.target] != 1 or node.target in self.attr_owners:
                return False
            if node.target in self.aliased or node.args != (prev,) or node.kwargs:
                return False
            prev = node
        return True

    def run(self) -> bool:
        self._build()
        graph = self._linear_graph()
        if any(n.kind.is_anchor for n in graph.nodes):
            result = plan(graph, self.ctx.judge, numpy_dtype(self._dtype))
            for sources, decline in result.declines:
                self.ctx.report.declined(sources, decline)
            self._write(result)
        self._explain_unmerged()
        if self.changed:
            self._restore_inplace()
            self._clean()
        return self.changed

    def _written_as(self) -> tuple[torch.dtype, Any]:
        """The dtype and device of the graph's first conv or Linear (what merges are written in)."""
        for entry in self.entries.values():
            found = weight_dtype_device(entry.op) if isinstance(entry, Unary) else None
            if found is not None:
                return found
        return torch.get_default_dtype(), torch.device("cpu")

    @property
    def _dtype(self) -> torch.dtype:
        return self._written_as()[0]

    def _linear_graph(self) -> LinearGraph:
        """The graph's linear nodes as the planner's IR (the torch.fx importer)."""
        default = self._dtype
        device = self._written_as()[1]
        nodes: list[LinearNode] = []
        for node in self.nodes:
            entry = self.entries.get(node)
            if isinstance(entry, Unary):
                meta = entry.input.meta.get("tensor_meta")
                dtype = meta.dtype if isinstance(meta, TensorMetadata) else default
                nodes.append(
                    op_node(entry.op, entry.input.name, node.name, dtype, device, self._weights(node), node)
                )
            elif isinstance(entry, Terms):
                coefs = []
                for _, tail in entry.terms:
                    c = 1.0
                    for op in tail:
                        c *= float(cast(float, op.scale))  # a sum's tails scale by numbers (_add_rule)
                    coefs.append(c)
                inputs = tuple(t.name for t, _ in entry.terms)
                nodes.append(
                    LinearNode(node.name, OpKind.SUM, inputs, node.name, coefs=tuple(coefs), origin=node)
                )
            elif isinstance(entry, Cat):
                inputs = tuple(t.name for t in entry.inputs)
                nodes.append(LinearNode(node.name, OpKind.CONCAT, inputs, node.name, origin=node))
        external: set[str] = set()
        outputs: set[str] = set()
        for node in self.nodes:
            for user in self._users(node):
                if user.op == "output":
                    outputs.add(node.name)
                if user not in self.entries:
                    external.add(node.name)
        shapes: dict[str, Sequence[int | None]] = {}
        for node in self.nodes:
            meta = node.meta.get("tensor_meta")
            if isinstance(meta, TensorMetadata):
                shapes[node.name] = self.ctx.known(tuple(int(d) for d in meta.shape))
        by_name = {n.name: n for n in self.nodes}

        def describe(name: str) -> str:
            outside = [u for u in self._users(by_name[name]) if u not in self.entries]
            return ", ".join(self._describe(u) for u in outside)

        return LinearGraph(nodes, external | outputs, outputs, shapes, describe=describe, pad_layer=True)

    def _weights(self, node: fx.Node) -> dict[Hashable, int]:
        """The parameters a node reads (a module's, or those it reads through get_attr)."""
        if node.op == "call_module":
            return parameter_sizes(self.gm.get_submodule(_target_name(node)))
        values = [self._const(a) for a in node.all_input_nodes if a.op == "get_attr"]
        return parameter_sizes(*values)

    def _inplace_hazard(self, root: fx.Node, nodes: set[fx.Node]) -> Decline | None:
        """An in-place write to a tensor the region reads, between its first read and its root:
        the merged conv, placed at the root, would read the modified tensor."""
        inputs = {i for n in nodes for i in n.all_input_nodes if i not in nodes}
        aliases = set()
        todo = list(inputs)
        while todo:  # the inputs and views of them
            n = todo.pop()
            if n in aliases:
                continue
            aliases.add(n)
            todo += [u for u in n.users if u.op in ("call_method", "call_function") and _is_view(u)]
        first = min(self.order[n] for n in nodes)
        for node in self.nodes[first : self.order[root]]:
            if node in nodes or getattr(node, "_erased", False):
                continue
            writes = _is_inplace(node, self.gm) or node in self.functionalized  # restored if not merged
            if writes and any(i in aliases for i in node.all_input_nodes):
                return Decline(
                    Reason.UNSUPPORTED,
                    f"{self._node_name(node)} modifies a tensor this linear region reads, in place, "
                    "between two of its reads",
                )
        return None

    # ------------------------------------------------------------------ explaining
    def _describe(self, node: fx.Node) -> str:
        """A node as a reader sees it in a report line."""
        if node.op == "output":
            return "the model output"
        if node.op == "placeholder":
            return f"the input {node.target!r}"
        if node.op == "get_attr":
            return f"the constant {node.target}"
        if node.op == "call_module":
            return f"{self._node_name(node)} ({type(self.gm.get_submodule(_target_name(node))).__name__})"
        read = _shape_read(node)
        if read:
            return f"{self._node_name(node)} (reads its {read}, which a merge cannot keep for this tensor)"
        if node.op == "call_method":
            return f"{self._node_name(node)} (.{node.target}())"
        return f"{self._node_name(node)} ({_qualified(node.target)})"

    def _explain_unmerged(self) -> None:
        """Every conv this graph kept as it was, and no report line names, gets one saying why.

        Reads the neighbours in the graph as traced: what feeds the conv and what reads it,
        and which of those convfuse does not read as linear ops.
        """
        named = _named_sources(self.ctx.report)
        for node in self.nodes:
            entry = self.entries.get(node)
            if not isinstance(entry, Unary) or not isinstance(entry.op, ConvOp) or entry.op.name in named:
                continue
            src, users = entry.input, self._users(node)
            src_users = self._users(src)
            linear_src = src in self.entries and src.op != "placeholder"
            linear_near = linear_src or any(u in self.entries for u in users)
            first = f"its input comes from {self._neighbour(src)}"
            if linear_src and len(src_users) > 1:
                others = ", ".join(self._describe(u) for u in src_users if u is not node)
                first += f", which is also read by {others}"
            if users:
                second = "its output goes to " + "; ".join(self._neighbour(u) for u in users)
            else:
                second = "its output is unused"
            if any(u.op == "output" for u in users) and linear_near:
                reason = Reason.GRAPH_OUTPUT
            elif linear_near and (len(users) > 1 or len(src_users) > 1):
                reason = Reason.SHARED_TENSOR
            else:
                reason = Reason.NOTHING_TO_MERGE
            message = f"nothing merged with it: {first}; {second}"
            self.ctx.report.declined((entry.op.name,), Decline(reason, message))

    def _neighbour(self, node: fx.Node) -> str:
        """A conv's neighbour described, with why convfuse does not fold across it."""
        text = self._describe(node)
        if node in self.entries or node.op not in ("call_module", "call_function", "call_method"):
            return text
        if _functional_form(node) is not None:
            return (
                text + ", an in-place write (a sum only when nothing but rank reads used its target before)"
            )
        return text if _shape_read(node) else text + ", which convfuse does not read as a linear op"

    # ------------------------------------------------------------------ write back
    def _write(self, result: Plan) -> None:
        """The plan as fx nodes (the torch.fx exporter): a merge is one conv module called on its
        input, a sum left with fewer terms a chain of adds; replaced nodes are erased."""
        by_name = self.by_name = {n.name: n for n in self.nodes}
        value: dict[str, fx.Node] = dict(by_name)
        for merges, resum in result.groups():
            fx_nodes = {n.origin for m in merges for n in m.nodes} | (
                {n.origin for n in resum.nodes} if resum else set()
            )
            root = max(fx_nodes, key=self.order.__getitem__)
            names = tuple(self._node_name(n) for n in sorted(fx_nodes, key=self.order.__getitem__))
            hazard = self._inplace_hazard(root, fx_nodes) or self._regrouped(merges, fx_nodes)
            if hazard is not None:
                self.ctx.report.declined(names, hazard)
                continue
            straight = resum is None and self._is_straight(merges[0])
            if self.straight_only and not straight:
                self._decline_new_code(names, fx_nodes)
                continue
            self.rewrites.append((straight, "" if straight else self._scope(fx_nodes)))
            replaced: list[tuple[fx.Node, fx.Node]] = []
            for merge in merges:
                last = max((n.origin for n in merge.nodes), key=self.order.__getitem__)
                target = (
                    self.target_of[merge.sources[0]] if straight else self._new_module_name(merge.sources)
                )
                types = layer_types(self.gm, merge.sources, self.prefix)
                self.gm.add_submodule(
                    target, layer_from_merge(merge, self._dtype_of(merge), self._written_as()[1], types)
                )
                with self.graph.inserting_before(last):
                    new = self.graph.call_module(target, (value[merge.x],))
                    if self._leading(merge) is not None:  # [N, C] from [B, ..., C]: as the reshapes did
                        new = self.graph.call_method("flatten", (new, 0, -2))
                value[merge.y] = new
                if merge.y in by_name:
                    replaced.append((by_name[merge.y], new))
                self.ctx.report.merged(
                    merge.kind,
                    merge.sources,
                    self._name(target),
                    merge.before,
                    merge.after,
                    merge.note,
                    merge.timing,
                )
            if resum is not None:
                sum_root = max((n.origin for n in resum.nodes), key=self.order.__getitem__)
                with self.graph.inserting_before(sum_root):
                    replaced.append((sum_root, self._sum(resum, value)))
            for old, new in replaced:
                old.replace_all_uses_with(new)
            for old, new in replaced:  # a term may read a replaced node: point it at the new one
                for user in list(old.users):
                    user.replace_input_with(old, new)
            for old, _ in replaced:
                self._replace(old, fx_nodes)
            self.changed = True

    def _leading(self, merge: Merge) -> tuple[int, int] | None:
        """Ranks of a merged Linear's input and output when the reshapes it replaces end with
        other leading dims than its input's (``bn(linear(x).flatten(0, 1))`` read as it is), else
        None: the Linear keeps its input's leading dims, so the writer flattens them back."""
        if not merge.linear or not any(n.layout == REGROUP for n in merge.nodes):
            return None
        metas = [
            self.by_name[t].meta.get("tensor_meta") if t in self.by_name else None for t in (merge.x, merge.y)
        ]
        known = [m for m in metas if isinstance(m, TensorMetadata)]
        if len(known) != len(metas):
            return (0, 0)
        before, after = (tuple(m.shape) for m in known)
        return None if before[:-1] == after[:-1] else (len(before), len(after))

    def _regrouped(self, merges: list[Merge], fx_nodes: set[fx.Node]) -> Decline | None:
        """Why a merge's output cannot be given back its leading dims (only a ``[N, C]`` output
        can: ``flatten(0, -2)`` of the Linear's, at every size), or why a tensor it replaces
        must stay: ``u.reshape_as(t)`` reads ``t``'s shape (not its values, so ``t`` is not
        external to the planner) and is not replaced with it."""
        for merge in merges:
            for node in {n.origin for n in merge.nodes} - {self.by_name.get(merge.y)}:
                kept = [u for u in node.users if u not in fx_nodes and not self._rank_read(u)]
                if kept:
                    return Decline(
                        Reason.SHARED_TENSOR,
                        f"{self._describe(kept[0])} reads the shape of {self._node_name(node)}, "
                        "which this merge replaces",
                    )
            ranks = self._leading(merge)
            if ranks is not None and (ranks[1] != 2 or ranks[0] < 2):
                return Decline(
                    Reason.RANK_MISMATCH,
                    f"the merged Linear layer would keep the leading dims of {merge.x}, which the reshapes "
                    f"it replaces regroup to another shape than [N, C]",
                )
        return None

    def _dtype_of(self, merge: Merge) -> torch.dtype:
        for node in merge.nodes:
            entry = self.entries.get(node.origin)
            op = entry.op if isinstance(entry, Unary) else None
            found = weight_dtype_device(op) if op is not None else None
            if found is not None:
                return found[0]
        meta = self.nodes[self.order[merge.nodes[0].origin]].meta.get("tensor_meta")
        return meta.dtype if isinstance(meta, TensorMetadata) else self._dtype

    def _sum(self, resum: Resum, value: dict[str, fx.Node]) -> fx.Node:
        """``sum_i c_i t_i`` as fx nodes: a positive term first, then adds and subs."""
        terms = sorted(resum.terms, key=lambda tc: tc[1] < 0)
        acc = value[terms[0][0]]
        if terms[0][1] != 1:
            acc = self.graph.call_function(operator.mul, (acc, terms[0][1]))
        for name, coef in terms[1:]:
            term = value[name]
            if coef == 1:
                acc = self.graph.call_function(operator.add, (acc, term))
            elif coef == -1:
                acc = self.graph.call_function(operator.sub, (acc, term))
            else:
                acc = self.graph.call_function(
                    operator.add, (acc, self.graph.call_function(operator.mul, (term, coef)))
                )
        return acc

    def _replace(self, root: fx.Node, nodes: set[fx.Node]) -> None:
        """Erase the replaced nodes once nothing reads them (rank reads move to the input)."""
        self._move_rank_reads(nodes, root)
        for node in sorted(nodes, key=self.order.__getitem__, reverse=True):
            if not getattr(node, "_erased", False) and not node.users:
                self.graph.erase_node(node)

    def _new_module_name(self, sources: Iterable[str]) -> str:
        """``<common parent of the merged layers>_fused`` on this graph's root (never inside a
        child whose own forward may still run), made unique."""
        parents = []
        for s in sources:
            if s in self.module_names:
                rel = s[len(self.prefix) + 1 :] if self.prefix else s
                parents.append(rel.split(".")[:-1])
            elif s in self.owners:  # a function call: it lives in the module that called it
                parents.append(self.owners[s])
        common: list[str] = []
        if parents:
            for parts in zip(*parents):
                if len(set(parts)) != 1:
                    break
                common.append(parts[0])
        base = "_".join(common + ["fused"])
        name, i = base, 0
        while self._has_path(name):
            i += 1
            name = f"{base}_{i}"
        return name

    def _has_path(self, target: str) -> bool:
        try:
            operator.attrgetter(target)(self.gm)
        except AttributeError:
            return False
        return True

    def _clean(self) -> None:
        """Drop constants and layers nothing uses any more, then regenerate the code."""
        removed_attrs: set[str] = set()
        for node in reversed(list(self.graph.nodes)):
            if node.users or node.op not in ("get_attr", "call_method", "call_function"):
                continue
            if node.op == "get_attr":
                removed_attrs.add(node.target)
                self.graph.erase_node(node)
            elif self._const(node) is not UNKNOWN or self._rank_read(node):
                self.graph.erase_node(node)
        still = {n.target for n in self.graph.nodes if n.op == "get_attr"}
        called = {n.target for n in self.graph.nodes if n.op == "call_module"}
        for target in removed_attrs - still:
            owner_path, _, leaf = target.rpartition(".")
            if owner_path in called:
                continue
            owner = self.gm.get_submodule(owner_path) if owner_path else self.gm
            if hasattr(owner, leaf):
                delattr(owner, leaf)
                self.dropped.append(target)
        for node in self.graph.nodes:
            if isinstance(node.type, str):
                # A PEP 563 string annotation ends up as a string global in the generated code,
                # which torch.save cannot pickle; the annotation carries no behaviour.
                node.type = None
        self.graph.lint()
        self.gm.delete_all_unused_submodules()
        self.gm.recompile()
