"""Shared model of an attention site and its rewrite into a fused NPU op.

The passes that find attention (SDPA ops, hand-written matmul/softmax chains)
describe each site as an AttentionSite in SDPA terms; the conditions below
decide whether the fused ops can take it (each returns None when it holds, or
the reason with the values), and rewrite_site replaces it:

- npu_prompt_flash_attention when the query length is static and > 1;
- npu_incre_flash_attention when it is 1;
- npu_fused_infer_attention_score when it is symbolic.

Masks convert to the NPU convention (1/True = masked out): a boolean "keep"
mask is negated, and an additive ``where(keep, 0, -inf)`` mask is traced back
to its boolean. is_causal becomes sparse_mode 3 (rightDownCausal) when query
and key lengths are equal and 2 (leftUpCausal, SDPA's top-left alignment)
otherwise.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Callable

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.fx.operator_schemas import normalize_function

from ..kernels._inference import COMPRESSED_MASK_SIZE, MAX_GQA_RATIO, MAX_HEAD_DIM, MAX_HEADS
from ..kernels._library import INT_MAX
from ..report import Report, Site, node_location
from ._context import PassContext
from ._fx import insert_call

aten = torch.ops.aten
npu_attn = torch.ops.npu_attn

CAUSAL_MASK_BUFFER = "npu_attn_compressed_causal_mask"
CONSTANT = "npu_attn_constant"  # node meta flag: computed from constants only
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

@dataclass
class AttentionSite:
    """One attention computation found in a graph, in SDPA terms (BNSD q/k/v).

    node: the node whose value is the attention output (or, with
    output_index, a tuple holding it); mask: SDPA-style, a boolean "keep"
    mask or an additive where(keep, 0, -inf/min) mask; internal: nodes of a
    hand-written chain that must have no users outside it."""

    node: torch.fx.Node
    query: torch.fx.Node
    key: torch.fx.Node
    value: torch.fx.Node
    mask: torch.fx.Node | None
    dropout_p: float
    is_causal: bool
    scale: float | None
    output_index: int | None
    internal: tuple[torch.fx.Node, ...] = ()
    mask_is_npu: bool = False  # mask is already boolean with True = masked out
    runtime_scale: torch.fx.Node | None = None  # the scale is a value known only when the graph runs

    @property
    def q_shape(self):
        return self.query.meta["val"].shape

    @property
    def k_shape(self):
        return self.key.meta["val"].shape

    @property
    def dtype(self) -> torch.dtype:
        return self.query.meta["val"].dtype


# ----------------------------------------------------------------------------
# Conditions: each returns None when it holds, else the reason with values.
# ----------------------------------------------------------------------------


def _no_dropout(site: AttentionSite) -> str | None:
    return None if site.dropout_p == 0.0 else f"dropout_p={site.dropout_p} (the inference ops have no dropout)"


def _only_output_used(site: AttentionSite) -> str | None:
    chain = set(site.internal) | {site.node}
    for inner in site.internal:
        outside = [u for u in inner.users if u not in chain]
        if outside:
            return f"intermediate {inner.name} is also used by {outside[0].name} (e.g. returned attention weights)"
    if site.output_index is None:
        return None
    used = {u.args[1] for u in site.node.users if u.target is operator.getitem}
    others = [u for u in site.node.users if u.target is not operator.getitem]
    if others or used - {site.output_index}:
        return "the logsumexp/auxiliary outputs are used (a training graph needs npu_fusion_attention)"
    return None


def _supported_dtype(site: AttentionSite) -> str | None:
    return None if site.dtype in SUPPORTED_DTYPES else f"query dtype {site.dtype} (needs float16/bfloat16/float32)"


def _four_dims(site: AttentionSite) -> str | None:
    dims = (len(site.q_shape), len(site.k_shape), len(site.value.meta["val"].shape))
    return None if dims == (4, 4, 4) else f"q/k/v ranks {dims} (needs 4-D BNSD)"


def _head_dim_supported(site: AttentionSite) -> str | None:
    d = site.q_shape[-1]
    if not statically_known_true(d % 16 == 0):
        return f"head_dim D={d} is not a multiple of 16"
    if not statically_known_true(d <= MAX_HEAD_DIM):
        return f"head_dim D={d} exceeds {MAX_HEAD_DIM}"
    if site.k_shape[-1] != d:
        return f"key head_dim {site.k_shape[-1]} != query head_dim {d}"
    return None


def _heads_supported(site: AttentionSite) -> str | None:
    n, nkv = site.q_shape[1], site.k_shape[1]
    if not (isinstance(n, int) and isinstance(nkv, int)):
        return f"symbolic head counts N={n}, N_kv={nkv}"
    if n > MAX_HEADS:
        return f"num_heads N={n} exceeds {MAX_HEADS}"
    if n % nkv:
        return f"num_heads N={n} not divisible by num_key_value_heads {nkv}"
    if n // nkv > MAX_GQA_RATIO:
        return f"GQA ratio {n // nkv} exceeds {MAX_GQA_RATIO}"
    return None


def _mask_supported(site: AttentionSite) -> str | None:
    if site.mask is None:
        return None
    if site.is_causal:
        return "both attn_mask and is_causal given"
    if site.mask_is_npu:
        if site.mask.meta["val"].dtype != torch.bool:
            return f"mask dtype {site.mask.meta['val'].dtype} (needs bool)"
    elif _boolean_keep_mask(site.mask) is None:
        return _bias_unsupported(site)  # an arbitrary additive mask goes in as pse_shift
    shape = site.mask.meta["val"].shape
    if len(shape) == 4 and not statically_known_true(shape[1] == 1):
        return f"per-head mask of shape {tuple(shape)} (the NPU mask is shared by heads)"
    return None


def _bias_target_shape(site: AttentionSite) -> list:
    b, n, sq, _ = site.q_shape
    return [b, n, sq, site.k_shape[2]]


def _bias_unsupported(site: AttentionSite) -> str | None:
    """An additive float mask we cannot read as a boolean is passed as
    pse_shift, which the ops add to the scaled scores exactly as the mask is
    added; it needs the query's dtype and a shape that broadcasts to
    (B, N, S_q, S_kv)."""
    val = site.mask.meta["val"]
    if val.dtype != site.dtype:
        return f"additive mask dtype {val.dtype} differs from the query's {site.dtype} (pse_shift needs the same)"
    target = _bias_target_shape(site)
    if val.dim() != 4 or not all(statically_known_true(m == 1) or statically_known_true(m == t)
                                 for m, t in zip(val.shape, target)):
        return f"additive mask of shape {tuple(val.shape)} does not broadcast to (B, N, S_q, S_kv) {tuple(target)}"
    return None


def _causal_expressible(site: AttentionSite) -> str | None:
    if not site.is_causal:
        return None
    sq, skv = site.q_shape[2], site.k_shape[2]
    if statically_known_true(sq == skv):
        return None
    if isinstance(sq, int) and isinstance(skv, int) and sq > 1:
        return None  # leftUpCausal (sparse_mode 2) is SDPA's top-left causal
    return f"is_causal with query length {sq} != key length {skv} and no static prompt shape"


def _static_scale(site: AttentionSite) -> str | None:
    if site.runtime_scale is None:
        return None
    return (f"the softmax scale is a runtime value ({site.runtime_scale.name}; torch.compile(dynamic=True) "
            "turns Python floats into graph inputs) but the fused ops take it as a constant: compile without "
            "dynamic=True, or set torch._dynamo.config.specialize_float = True")


CONDITIONS: tuple[Callable[[AttentionSite], str | None], ...] = (
    _no_dropout, _only_output_used, _static_scale, _supported_dtype, _four_dims, _head_dim_supported,
    _heads_supported, _mask_supported, _causal_expressible,
)


# ----------------------------------------------------------------------------
# Replacement
# ----------------------------------------------------------------------------


def _scalar_value(node: object) -> float | None:
    """The value of a Python number or of a constant-filled tensor node."""
    if isinstance(node, (int, float)):
        return float(node)
    if not isinstance(node, torch.fx.Node) or node.op != "call_function":
        return None
    if node.target is aten.scalar_tensor.default:
        return float(node.args[0])
    if node.target is aten.full.default:
        return float(node.args[1])
    if node.target is aten.zeros.default:
        return 0.0
    if node.target is aten.ones.default:
        return 1.0
    return None


# Shape-only ops that may sit between a where(keep, 0, -inf) mask and its use
# (transformers slices the cache-length mask to the keys in use).
MASK_RESHAPES = (aten.slice.Tensor, aten.expand.default, aten.view.default, aten.unsqueeze.default)


def _boolean_keep_mask(mask: torch.fx.Node) -> tuple[torch.fx.Node, list[torch.fx.Node]] | None:
    """The boolean "keep" mask behind an SDPA mask node, and the shape-only ops
    between them (to replay on the boolean), if it has one."""
    reshapes = []
    while mask.target in MASK_RESHAPES and mask.meta["val"].dtype != torch.bool:
        reshapes.append(mask)
        mask = mask.args[0]
    if mask.meta["val"].dtype == torch.bool:
        return mask, reshapes[::-1]
    if mask.target is aten.where.self:
        cond, if_true, if_false = mask.args
        # -inf, or the dtype's lowest value that eager masks use: both give a
        # zero weight wherever any key of the row is kept.
        masked_value = _scalar_value(if_false)
        lowest = torch.finfo(mask.meta["val"].dtype).min
        if _scalar_value(if_true) == 0.0 and masked_value is not None and masked_value in (-math.inf, lowest):
            return cond, reshapes[::-1]
    return None


def _npu_mask(gm: torch.fx.GraphModule, mask: torch.fx.Node, before: torch.fx.Node) -> torch.fx.Node:
    """NPU mask (True = masked out) from an SDPA-style mask accepted by _mask_supported."""
    keep, reshapes = _boolean_keep_mask(mask)
    for op in reshapes:  # the same slicing/broadcasting, applied to the boolean
        keep = _call(gm, op.target, (keep, *op.args[1:]), dict(op.kwargs), before)
    return _call(gm, aten.logical_not.default, (keep,), {}, before)


def _causal_mask_node(gm: torch.fx.GraphModule, like: torch.fx.Node, ctx: PassContext) -> torch.fx.Node:
    """The compressed causal mask triu(ones(2048, 2048), 1), built once per graph.

    It is computed in the graph rather than held as a constant so that every
    executor (Inductor included) treats it like any other value; building it
    costs one 4 MiB comparison per call, shared by all sites (the eager executor
    folds it into a constant, GE's constant folding does the same)."""
    device = like.meta["val"].device
    for node in gm.graph.find_nodes(op="call_function", target=aten.lt.Tensor):
        if node.meta.get(CAUSAL_MASK_BUFFER) == device:
            return node
    first = next(n for n in gm.graph.nodes if n.op != "placeholder")
    # Ops every consumer takes: prims.iota for Inductor (which lowers graphs decomposed
    # to prims), aten.arange for TorchAir (which has no iota converter).
    if ctx.target == "ge":
        positions = _call(gm, aten.arange.start, (0, COMPRESSED_MASK_SIZE), dict(dtype=torch.int64, device=device),
                          first, fake_from=like)
    else:
        positions = _call(gm, torch.ops.prims.iota.default, (COMPRESSED_MASK_SIZE,),
                          dict(start=0, step=1, dtype=torch.int64, device=device, requires_grad=False), first,
                          fake_from=like)
    rows = _call(gm, aten.unsqueeze.default, (positions, 1), {}, first)
    cols = _call(gm, aten.unsqueeze.default, (positions, 0), {}, first)
    mask = _call(gm, aten.lt.Tensor, (rows, cols), {}, first)  # key after query: masked out
    mask.meta[CAUSAL_MASK_BUFFER] = device
    for node in (positions, rows, cols, mask):
        node.meta[CONSTANT] = True  # executors may fold it into a constant
    return mask


def _call(gm: torch.fx.GraphModule, target, args: tuple, kwargs: dict, like: torch.fx.Node,
          fake_from: torch.fx.Node | None = None) -> torch.fx.Node:
    """Insert target(*args, **kwargs) before `like`, with its fake value as meta."""
    return insert_call(gm, target, args, kwargs, before=like, fake_from=fake_from)


def rewrite_site(gm: torch.fx.GraphModule, site: AttentionSite,
                 ctx: PassContext) -> tuple[str, int | None, str, torch.fx.Node]:
    """Replace the site with its fused op; returns (op name, sparse_mode, layout, fused node)."""
    n, nkv = site.q_shape[1], site.k_shape[1]
    sq, skv = site.q_shape[2], site.k_shape[2]
    scale = site.scale if site.scale is not None else 1.0 / math.sqrt(site.q_shape[-1])
    node = site.node
    atten_mask, pse_shift, sparse_mode = None, None, 0
    if site.mask is not None and not site.mask_is_npu and _boolean_keep_mask(site.mask) is None:
        pse_shift = _call(gm, aten.expand.default, (site.mask, _bias_target_shape(site)), {}, node)
    elif site.mask is not None:
        if site.mask_is_npu:
            atten_mask = site.mask
        else:
            atten_mask = _npu_mask(gm, site.mask, node)
        sparse_mode = 1  # allMask: exactly the given mask, no band
    elif site.is_causal:
        atten_mask = _causal_mask_node(gm, site.query, ctx)
        sparse_mode = 3 if statically_known_true(sq == skv) else 2

    # Match the memory layout the original kernel produced (the CPU and CUDA
    # flash kernels return BNSD views of BSND memory), so the graph's later
    # views stay valid and no transpose copy is needed: the fused op writes
    # BSND directly (input_layout BNSD_BSND) and a permute gives the view.
    layout = "BNSD_BSND" if _output_is_bsnd_memory(site) and not (isinstance(sq, int) and sq == 1) else "BNSD"
    common = dict(atten_mask=atten_mask, pse_shift=pse_shift, num_heads=n, input_layout=layout,
                  num_key_value_heads=0 if n == nkv else nkv)
    if isinstance(sq, int) and sq == 1 and not site.is_causal:
        op = npu_attn.npu_incre_flash_attention.default
        fused = _call(gm, op, (site.query, site.key, site.value), dict(common, scale_value=scale), node)
        sparse_mode = None
    elif isinstance(sq, int):
        op = npu_attn.npu_prompt_flash_attention.default
        fused = _call(gm, op, (site.query, site.key, site.value),
                      dict(common, scale_value=scale, sparse_mode=sparse_mode,
                           pre_tokens=INT_MAX, next_tokens=INT_MAX), node)
    else:
        op = npu_attn.npu_fused_infer_attention_score.default
        both = _call(gm, op, (site.query, site.key, site.value),
                     dict(common, scale=scale, sparse_mode=sparse_mode), node)
        fused = _call(gm, operator.getitem, (both, 0), {}, node)

    fused_op_node = fused if fused.target is op else fused.args[0]
    if layout == "BNSD_BSND":
        fused = _call(gm, aten.permute.default, (fused, [0, 2, 1, 3]), {}, node)
    if site.output_index is None:
        node.replace_all_uses_with(fused)
    else:
        for user in list(node.users):
            user.replace_all_uses_with(fused)
            gm.graph.erase_node(user)
    gm.graph.erase_node(node)
    return op.__name__.split(".")[0], sparse_mode, layout, fused_op_node


def _output_is_bsnd_memory(site: AttentionSite) -> bool:
    val = site.node.meta["val"]
    out = val if site.output_index is None else val[site.output_index]
    stride = out.stride()
    return statically_known_true(stride[2] > stride[1])


def float32_left_unfused(site: AttentionSite, ctx: PassContext) -> str | None:
    if ctx.fp32_attention == "unfused" and site.query.meta["val"].dtype == torch.float32:
        return "float32 attention left as plain math (fp32_attention='unfused'; the NPU ops take float16/bfloat16)"
    return None


def apply_to_sites(gm: torch.fx.GraphModule, sites: list[tuple[AttentionSite, str]], report: Report,
                   ctx: PassContext) -> None:
    """Check each (site, pattern name) and rewrite the ones every condition allows."""
    for site, pattern in sites:
        layer, source = node_location(site.node)
        record = Site(kind="attention", graph=ctx.graph_name, layer=layer, source=source, pattern=pattern)
        reasons = (condition(site) for condition in CONDITIONS)  # the first that fails, in order
        record.reason = next((r for r in reasons if r is not None), None) or float32_left_unfused(site, ctx)
        if record.reason is None:
            record.gqa_ratio = site.q_shape[1] // site.k_shape[1]
            record.fused_op, record.sparse_mode, record.layout, fused_node = rewrite_site(gm, site, ctx)
            fused_node.meta["npu_attn_site"] = record  # later passes refine the record
        report.sites.append(record)
    if sites:
        gm.graph.eliminate_dead_code()  # the replaced chains' remains
        gm.graph.lint()
        gm.recompile()
