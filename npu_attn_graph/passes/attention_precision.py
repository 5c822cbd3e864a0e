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
from ._fx import fake_result, insert_call

aten = torch.ops.aten
npu_attn = torch.ops.npu_attn

SINGLE_OUTPUT = (npu_attn.npu_prompt_flash_attention.default, npu_attn.npu_incre_flash_attention.default)
TUPLE_OUTPUT = (npu_attn.npu_fused_infer_attention_score.default,)
CAST_KWARGS = ("pse_shift",)


def attention_precision(gm: torch.fx.GraphModule, report: Report, ctx: PassContext) -> None:
    low = ctx.attention_cast_dtype
    if low is None:
        return
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in SINGLE_OUTPUT + TUPLE_OUTPUT:
            continue
        if node.args[0].meta["val"].dtype != torch.float32:
            continue
        reads_cache = any(_is_kv_cache(a) for a in node.args[1:3])
        _cast_inputs(gm, node, low)
        outputs = [node] if node.target in SINGLE_OUTPUT else [
            u for u in node.users if u.target is operator.getitem and u.args[1] == 0]
        for out in outputs:
            restored = insert_call(gm, aten._to_copy.default, (out,), {"dtype": torch.float32}, after=out)
            out.replace_all_uses_with(restored, delete_user_cb=lambda user: user is not restored)
        site = node.meta.get("npu_attn_site")
        if site is not None:
            site.precision = f"float32 via {str(low).replace('torch.', '')}"
            if reads_cache:
                site.precision += " (casts the whole KV cache on every call: use a float16/bfloat16 model)"
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()


KV_WRITERS = (npu_attn.scatter_update.default, npu_attn.scatter_update_.default)
VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.slice.Tensor,
         aten.alias.default, aten.expand.default, aten.permute.default, aten.transpose.int)


def _is_kv_cache(node: object) -> bool:
    """Key/value that is (a view of) a cache input or a cache writer's result."""
    while isinstance(node, torch.fx.Node) and node.target in VIEWS:
        node = node.args[0]
    if not isinstance(node, torch.fx.Node):
        return False
    if node.op == "placeholder" or node.target in KV_WRITERS:
        return True
    return (node.target is operator.getitem and isinstance(node.args[0], torch.fx.Node)
            and node.args[0].target is npu_attn.npu_scatter_pa_kv_cache_functional.default)


def _cast_inputs(gm: torch.fx.GraphModule, node: torch.fx.Node, low: torch.dtype) -> None:
    def cast(arg):
        if isinstance(arg, torch.fx.Node) and arg.meta["val"].dtype == torch.float32:
            return insert_call(gm, aten._to_copy.default, (arg,), {"dtype": low}, before=node)
        return arg

    node.args = tuple(cast(a) for a in node.args[:3]) + tuple(node.args[3:])
    node.kwargs = {k: cast(v) if k in CAST_KWARGS else v for k, v in node.kwargs.items()}
    node.meta["val"] = fake_result(node.target, node.args, node.kwargs)
    for user in node.users:  # getitem fakes follow the new output
        if user.target is operator.getitem:
            user.meta["val"] = node.meta["val"][user.args[1]]
