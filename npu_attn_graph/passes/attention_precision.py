"""Compute float32 attention sites in float16/bfloat16 inside the fused op.

The NPU's inference attention ops (prompt/incre/fused_infer) take float16 or
bfloat16 only, and a GE graph must never hold one with a dtype it does not
take. For a float32 model bound for GE (PassContext.fp32_attention is
"float16" or "bfloat16"), each fused inference attention op whose query is
float32 gets explicit casts:

    q, k, v (and pse_shift) -> _to_copy(dtype=low) -> fused op -> _to_copy(dtype=float32)

Rule = pattern + condition + replacement:
- pattern: a fused inference attention node (the attention passes made it);
- condition: its query is float32 and the context asks for a cast;
- replacement: the same node on cast inputs, its attention output cast back.
The softmax LSE output of fused_infer_attention_score is float32 already.
Where key/value are a KV cache (decode), the cast copies the whole cache on
every call; the site's precision note says so (deploy float16 models).
Runs last, after the passes that reshape the fused op's inputs.
"""

from __future__ import annotations

import operator

import torch

from ..report import Report
from ._context import PassContext
from ._fx import SITE, fake_result, insert_call
from .registry import ATTENTION_OPS, WRITER_OPS, FusedAttentionOp

aten = torch.ops.aten


def attention_precision(gm: torch.fx.GraphModule, report: Report, ctx: PassContext) -> int:
    """Returns how many fused ops were given casts."""
    low = ctx.attention_cast_dtype
    if low is None:
        return 0
    changed = 0
    for node in list(gm.graph.nodes):
        op = ATTENTION_OPS.get(node.target) if node.op == "call_function" else None
        if op is None or node.args[0].meta["val"].dtype != torch.float32:
            continue
        reads_cache = any(_is_kv_cache(node.args[i]) for i in (op.key_arg, op.value_arg))
        if not _cast_inputs(gm, node, op, low):
            continue
        outputs = [node] if op.output_index is None else [
            u for u in node.users if u.target is operator.getitem and u.args[1] == op.output_index]
        for out in outputs:
            restored = insert_call(gm, aten._to_copy.default, (out,), {"dtype": torch.float32}, after=out)
            out.replace_all_uses_with(restored, delete_user_cb=lambda user: user is not restored)
        site = node.meta.get(SITE)
        if site is not None:
            site.precision = f"float32 via {str(low).replace('torch.', '')}"
            if reads_cache:
                site.precision += " (casts the whole KV cache on every call: use a float16/bfloat16 model)"
        changed += 1
    if changed:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
    return changed


VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.slice.Tensor,
         aten.alias.default, aten.expand.default, aten.permute.default, aten.transpose.int)


def _is_kv_cache(node: object) -> bool:
    """Key/value that is (a view of) a cache input or a cache writer's result."""
    while isinstance(node, torch.fx.Node) and node.target in VIEWS:
        node = node.args[0]
    if not isinstance(node, torch.fx.Node):
        return False
    if node.op == "placeholder" or node.target in WRITER_OPS:
        return True
    return (node.target is operator.getitem and isinstance(node.args[0], torch.fx.Node)
            and node.args[0].target in WRITER_OPS)


def _cast_inputs(gm: torch.fx.GraphModule, node: torch.fx.Node, op: FusedAttentionOp, low: torch.dtype) -> bool:
    """Cast the op's float32 inputs to `low`; False (nothing changed) if the op's
    validation rejects the cast call."""
    def cast(arg):
        if isinstance(arg, torch.fx.Node) and arg.meta["val"].dtype == torch.float32:
            return insert_call(gm, aten._to_copy.default, (arg,), {"dtype": low}, before=node)
        return arg

    args = tuple(cast(a) if i in op.cast_args else a for i, a in enumerate(node.args))
    kwargs = {k: cast(v) if k in op.cast_kwargs else v for k, v in node.kwargs.items()}
    try:
        value = fake_result(node.target, args, kwargs)
    except Exception:  # noqa: BLE001 - the op's own validation says no: keep float32
        for new in {*args, *kwargs.values()} - {*node.args, *node.kwargs.values()}:
            if isinstance(new, torch.fx.Node) and not new.users:
                gm.graph.erase_node(new)
        return False
    node.args, node.kwargs = args, kwargs
    node.meta["val"] = value
    for user in node.users:  # getitem fakes follow the new output
        if user.target is operator.getitem:
            user.meta["val"] = node.meta["val"][user.args[1]]
    return True
