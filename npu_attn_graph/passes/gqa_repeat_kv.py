"""Remove repeat_kv in front of fused attention: GQA through num_key_value_heads.

Eager GQA code repeats each key/value head for its group of query heads before
attention (transformers' repeat_kv: unsqueeze, expand, reshape; or
repeat_interleave). The fused ops take the un-repeated K/V and
num_key_value_heads instead, so the repeated K/V is never materialised.

Rule = pattern + condition + replacement:
- pattern: a fused op's key and value are each a repeat of a tensor along
  the head axis (REPEAT_KV_PATTERNS);
- condition: both repeat the same factor, and the op's GQA limits hold
  (num_heads divisible by the KV heads, ratio <= 64);
- replacement: feed the un-repeated tensors and set num_key_value_heads.
"""

from __future__ import annotations

import torch
from torch._inductor.pattern_matcher import CallFunction, Ignored, KeywordArg, is_match

from ..kernels._inference import MAX_GQA_RATIO
from ..report import Report
from ._context import PassContext

aten = torch.ops.aten
npu_attn = torch.ops.npu_attn

# BNSD key/value (B, Nkv, S, D) -> (B, Nkv * G, S, D)
_expanded = CallFunction(aten.expand.default, CallFunction(aten.unsqueeze.default, KeywordArg("kv"), 2), Ignored())
_copied = CallFunction(aten.clone.default, _expanded, memory_format=Ignored())
REPEAT_KV_PATTERNS = (
    CallFunction(aten._unsafe_view.default, _copied, Ignored()),
    CallFunction(aten.view.default, _copied, Ignored()),
    CallFunction(aten.reshape.default, _copied, Ignored()),
    CallFunction(aten.reshape.default, _expanded, Ignored()),
    CallFunction(aten.repeat_interleave.self_int, KeywordArg("kv"), Ignored(), 1),
)

# Fused ops that take BNSD key/value as their second and third arguments.
FUSED_ATTENTION = (
    npu_attn.npu_prompt_flash_attention.default,
    npu_attn.npu_incre_flash_attention.default,
    npu_attn.npu_fused_infer_attention_score.default,
)


def unrepeated(node: torch.fx.Node) -> torch.fx.Node | None:
    """The tensor `node` repeats along the head axis, if it is such a repeat."""
    for pattern in REPEAT_KV_PATTERNS:
        match = pattern.match(node)
        if is_match(match):
            return match.kwargs["kv"]
    return None


def _heads(node: torch.fx.Node) -> int:
    return node.meta["val"].shape[1]


def gqa_repeat_kv(gm: torch.fx.GraphModule, report: Report, ctx: PassContext) -> None:
    changed = False
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in FUSED_ATTENTION:
            continue
        if node.kwargs.get("input_layout", "BSH").split("_")[0] != "BNSD" or node.kwargs.get("block_table"):
            continue
        query, key, value = node.args[:3]
        source_k, source_v = unrepeated(key), unrepeated(value)
        if source_k is None or source_v is None:
            continue
        heads, kv_heads = _heads(query), _heads(source_k)
        site = node.meta.get("npu_attn_site")
        if _heads(source_v) != kv_heads or heads % kv_heads or heads // kv_heads > MAX_GQA_RATIO:
            if site is not None:
                site.reason = (f"repeat_kv kept: key/value heads {kv_heads}/{_heads(source_v)} "
                               f"do not fit num_heads={heads} (ratio <= {MAX_GQA_RATIO})")
            continue
        node.args = (query, source_k, source_v, *node.args[3:])
        node.kwargs = {**node.kwargs, "num_key_value_heads": 0 if kv_heads == heads else kv_heads}
        if site is not None:
            site.gqa_ratio = heads // kv_heads
            site.pattern += "+repeat_kv"
        changed = True
    if changed:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
