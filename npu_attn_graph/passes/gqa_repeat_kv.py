"""Remove repeat_kv in front of fused attention: GQA through num_key_value_heads.

Eager GQA code repeats each key/value head for its group of query heads before
attention (transformers' repeat_kv: unsqueeze, expand, reshape; or
repeat_interleave). The fused ops take the un-repeated K/V and
num_key_value_heads instead, so the repeated K/V is never materialised.

Rule = pattern + condition + replacement:
- pattern: a fused op's key and value are each a repeat of a tensor along
  the head axis (REPEAT_KV_PATTERNS, with the shapes of a head repeat);
- condition: the op's own validation accepts the un-repeated tensors with
  num_key_value_heads (GQA ratio, divisibility, value heads); otherwise the
  repeat stays and the site's row says why;
- replacement: feed the un-repeated tensors and set num_key_value_heads.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.fx.operator_schemas import normalize_function

from ..report import Report
from ._context import PassContext
from ._fx import SITE, fake_result, is_call, same_shape, skip_full_slices, val
from .registry import ATTENTION_OPS

aten = torch.ops.aten
npu_attn = torch.ops.npu_attn

# A pattern is (target, args, kwargs), each argument a pattern, ANY, KV (the
# repeated tensor, captured) or a constant. They are matched as Inductor's
# pattern matcher matches CallFunction patterns (same arity, the pattern's
# keywords, constants equal, every node below the root used once), without
# importing it: that import costs seconds on the first compile, which
# aot_eager's does not pay (bench/compile_overhead.py).
ANY, KV = object(), object()
# BNSD key/value (B, Nkv, S, D) -> (B, Nkv * G, S, D): transformers' repeat_kv,
# x[:, :, None].expand(B, Nkv, G, S, D).reshape(B, Nkv * G, S, D), or repeat_interleave.
_expanded: tuple = (aten.expand.default, ((aten.unsqueeze.default, (KV, 2), {}), ANY), {})
_copied = (aten.clone.default, (_expanded,), {"memory_format": ANY})
REPEAT_KV_PATTERNS: tuple[tuple, ...] = (
    (aten._unsafe_view.default, (_copied, ANY), {}),
    (aten.view.default, (_copied, ANY), {}),
    (aten.reshape.default, (_copied, ANY), {}),
    (aten.reshape.default, (_expanded, ANY), {}),
    (aten.repeat_interleave.self_int, (KV, ANY, 1), {}),
)
_MERGES = (aten._unsafe_view.default, aten.view.default, aten.reshape.default)


def _repeat_with_full_slices(node: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node] | None:
    """(source, expand) of the expand form with no-op slices around the
    unsqueeze, as symbolic shapes trace x[:, :, None] (slice(x, 0, 0, end),
    unsqueeze, slice(.., 3, 0, end)). The pattern language has no optional
    nodes, so this one form is walked by hand."""
    if not is_call(node, _MERGES):
        return None
    expand: Any = node.args[0]  # a pattern's node: the checks below decide what it is
    if is_call(expand, aten.clone.default):
        expand = expand.args[0]
    if not is_call(expand, aten.expand.default):
        return None
    unsqueeze = skip_full_slices(expand.args[0])
    if not (is_call(unsqueeze, aten.unsqueeze.default) and unsqueeze.args[1] == 2):
        return None
    return skip_full_slices(unsqueeze.args[0]), expand


def _match(pattern: object, node: Any, found: dict[str, Any], root: bool = False) -> bool:
    """node matches pattern; records the KV node as found["kv"] and the expand node as found["expand"]."""
    if pattern is ANY:
        return True
    if pattern is KV:
        found["kv"] = node
        return True
    if not isinstance(pattern, tuple):  # a constant argument
        return not isinstance(node, torch.fx.Node) and node == pattern
    target, args, kwargs = pattern
    if not (is_call(node, target) and len(node.args) == len(args) and (root or len(node.users) == 1)):
        return False
    node_args, node_kwargs = node.args, node.kwargs
    if len(node_kwargs) < len(kwargs):  # keywords the call leaves to their defaults
        normalized = normalize_function(target, node.args, node.kwargs)
        if normalized is None or len(normalized.args) != len(args) or len(normalized.kwargs) < len(kwargs):
            return False
        node_args, node_kwargs = normalized
    node_kwargs = {k: v for k, v in node_kwargs.items() if k in kwargs}
    if list(node_kwargs) != list(kwargs):
        return False
    if target is aten.expand.default:
        found["expand"] = node
    return all(_match(p, n, found) for p, n in zip((*args, *kwargs.values()), (*node_args, *node_kwargs.values())))


def _repeat(node: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node | None] | None:
    """(source, expand node or None for repeat_interleave) if node has a repeat's form."""
    for pattern in REPEAT_KV_PATTERNS:
        found: dict[str, Any] = {}
        if _match(pattern, node, found, root=True):
            return found["kv"], found.get("expand")
    return _repeat_with_full_slices(node)


def unrepeated(node: torch.fx.Node) -> torch.fx.Node | None:
    """The tensor `node` repeats along the head axis (head h = source head h // G),
    if it is such a repeat: the pattern, and shapes (B, N, S, D) -> (B, N * G, S, D)."""
    found = _repeat(node)
    if found is None:
        return None
    source, expand = found
    src, out = val(source).shape, val(node).shape
    if len(src) != 4 or len(out) != 4 or not same_shape((src[0], src[2], src[3]), (out[0], out[2], out[3])):
        return None
    if expand is None:
        return source if node.args[2] == 1 else None
    groups = val(expand).shape
    if len(groups) == 5 and same_shape((groups[0], groups[1], groups[3], groups[4]), src) and \
            statically_known_true(groups[1] * groups[2] == out[1]):
        return source
    return None


def _heads(node: torch.fx.Node) -> int:
    return node.meta["val"].shape[1]


def gqa_repeat_kv(gm: torch.fx.GraphModule, report: Report, ctx: PassContext) -> int:
    """Returns how many fused ops now read un-repeated K/V."""
    rewritten = 0
    for node in gm.graph.nodes:
        op = ATTENTION_OPS.get(node.target) if node.op == "call_function" else None
        if op is None or node.kwargs.get("input_layout", "BSH").split("_")[0] != "BNSD" \
                or node.kwargs.get("block_table") is not None:
            continue
        key, value = node.args[op.key_arg], node.args[op.value_arg]
        source_k, source_v = unrepeated(key), unrepeated(value)
        site = node.meta.get(SITE)
        if source_k is None or source_v is None:
            continue
        heads, kv_heads = _heads(node.args[0]), _heads(source_k)
        old_args, old_kwargs = node.args, node.kwargs
        args = list(node.args)
        args[op.key_arg], args[op.value_arg] = source_k, source_v
        node.args = tuple(args)
        node.kwargs = {**node.kwargs, "num_key_value_heads": 0 if kv_heads == heads else kv_heads}
        try:  # the op's own validation decides (GQA ratio, divisibility, value heads)
            new_val = fake_result(node.target, node.args, node.kwargs)
        except Exception as error:  # noqa: BLE001 - any rejection keeps the repeat
            node.args, node.kwargs = old_args, old_kwargs
            if site is not None:
                site.notes.append(f"repeat_kv kept: {str(error).strip().splitlines()[0]}")
            continue
        node.meta["val"] = new_val
        if site is not None:
            site.gqa_ratio = heads // kv_heads
            site.pattern += "+repeat_kv"
        rewritten += 1
    if rewritten:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
    return rewritten
