"""Why nothing merged: the report lines for convolutions left unmerged after the walk, and for a
``nn.Sequential`` whose runs did not merge.
"""

from __future__ import annotations

from torch import nn

from ...decline import Decline, Reason
from .context import _CONV, _Context, _join, _named_sources
from .ops import ConvOp, LinearOp
from .rules import module_op


def _explain_remaining_convs(module: nn.Module, ctx: _Context) -> None:
    """The last guard against silent skips: every conv layer of ``module`` that no merge or
    decline names (nor a function call inside it, ``name:node``) gets a line saying why."""
    named = _named_sources(ctx.report)
    owners = {s.split(":", 1)[0] for s in named if ":" in s}
    root = type(module).__name__
    for name, m in module.named_modules():
        if not isinstance(m, _CONV) or name in named or name in owners:
            continue
        shown = name or root
        op = module_op(m, shown)
        if isinstance(op, Decline):
            ctx.report.declined((shown,), op)
            continue
        if op is None:
            ctx.report.declined(
                (shown,), Decline(Reason.UNSUPPORTED, f"convfuse has no rule for {type(m).__name__} layers")
            )
            continue
        parts = name.split(".") if name else []
        ancestors = [".".join(parts[:k]) or root for k in range(len(parts))]
        untraced = [a for a in ancestors if a in ctx.untraced]
        back = [a for a in ancestors + [name] if (a if a != root else "") in ctx.checked_back]
        split = [a for a in ancestors if a in ctx.split or (a == root and "the model" in ctx.split)]
        if back:
            ctx.report.declined(
                (shown,),
                Decline(
                    Reason.SELF_CHECK, f"{back[-1]} was put back as it was by the self-check (see that line)"
                ),
            )
            continue
        if split and (not untraced or ancestors.index(split[-1]) > ancestors.index(untraced[-1])):
            why = (
                f"its parent calls the layers of Sequential {split[-1]} one by one rather than the "
                "Sequential as a whole, so they are not merged across its children"
            )
        elif untraced:
            why = f"it was fused on its own because torch.fx could not trace {untraced[-1]} (see that line)"
        elif not name:
            why = "the model is this one layer"
        elif name not in ctx.seen:
            why = "the traced forward never calls it"
        else:
            why = "no linear layer next to it was found"
        ctx.report.declined((shown,), Decline(Reason.NOTHING_TO_MERGE, f"nothing merged with it: {why}"))


def _explain_sequential(
    items: list[tuple[str, nn.Module, list[LinearOp] | Decline | None]], prefix: str, ctx: _Context
) -> None:
    """Every conv of a Sequential's linear runs that no report line names gets one saying why:
    its run folds to no fewer layers, between layers convfuse does not read as linear."""
    named = _named_sources(ctx.report)
    where = f"Sequential {prefix!r}" if prefix else "the Sequential"

    def layer(i: int) -> str:
        key, child, _ = items[i]
        return f"{_join(prefix, key)} ({type(child).__name__})"

    def not_linear(n: int) -> str:
        return (
            "which convfuse does not read as a linear layer"
            if n == 1
            else "neither read as linear by convfuse"
        )

    i = 0
    while i < len(items):
        if not isinstance(items[i][2], list):
            i += 1
            continue
        lo = i
        while i < len(items) and isinstance(items[i][2], list):
            i += 1
        ops = [op for _, _, run_ops in items[lo:i] if isinstance(run_ops, list) for op in run_ops]
        convs = [op for op in ops if isinstance(op, ConvOp)]
        ctx.seen.update(op.name for op in convs)
        before = f"after {layer(lo - 1)}" if lo > 0 else f"at the start of {where}"
        after = f"before {layer(i)}" if i < len(items) else f"at the end of {where}"
        place = f"{before} and {after}" if lo > 0 or i < len(items) else f"alone in {where}"
        if len(ops) == 1:
            around = f"nothing linear next to it: it sits {place}"
        else:
            names = ", ".join(op.name for op in ops)
            place = place.replace("alone in", "all of")
            around = f"its linear run ({names}) folds to no fewer layers; the run sits {place}"
        neighbours = int(lo > 0) + int(i < len(items))
        for op in convs:
            if op.name not in named:
                message = around + (f", {not_linear(neighbours)}" if neighbours else "")
                ctx.report.declined((op.name,), Decline(Reason.NOTHING_TO_MERGE, message))
