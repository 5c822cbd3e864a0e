"""The npu_attn backend's graph passes, in one fixed order.

PIPELINE is the order; the backend's ``passes`` option selects which run, it
never reorders them. Three passes run before AOT autograd, on dynamo's graph,
only when gradients are needed (training_sdpa_to_fusion,
training_eager_attention_to_fusion with TRAINING_EAGER_RULE on a pre-dispatch
ATen trace of it, training_packed_to_tnd); the others run on
each post-AOT (functionalized ATen) graph, and after them the completeness
check (unfused_sites) lists whatever attention-shaped softmax or cache write
is left, so the report never misses a site. Each pass's time and rewrite count
go into the Report.

The attention and KV-cache rules (each a pattern, a check and a rewrite; see
_rules) are, by pass:

- sdpa_to_fused: SDPA_RULE (every ATen form of F.scaled_dot_product_attention);
- eager_attention_to_fused: EAGER_RULE (bmm -> [scale, casts, masks, biases]
  -> softmax -> [casts, eval dropout] -> bmm, in any spelling that reaches it);
- attention_sinks_to_fused: SINK_RULE (the same, with a per-head sink logit
  concatenated before the softmax and dropped after it -> FIA v2's
  learnable_sink);
- static_cache_update: STATIC_WRITE_RULE (index_copy / index_put / slice
  assignment of contiguous positions into a graph input or buffer);
- sliding_window_cache_update: SLIDING_WINDOW_RULE (roll(-1) + a write into
  the shifted window, copied back: a full sliding-window cache step) and
  WINDOW_FILL_RULE (the window copied from the last W positions of new states);
- paged_cache_update: PAGED_WRITE_RULE (key and value written through one
  slot mapping into paged caches);
- paged_attention_read: PAGED_READ_RULE (a fused attention op whose K/V are a
  gather of paged caches through a block table and whose mask is provably
  "key j kept iff j < L[b]" for a lengths tensor L -> the op's paged wrapper
  with the caches, block_table, block_size and the lengths as a tensor). It
  runs after the attention rules, gqa_repeat_kv and paged_cache_update: they
  have read the attention's spelling, removed repeat_kv and fused the cache
  writes, so it only proves the gather and the mask and retargets the op; and
  before attention_layout and attention_precision, which refine the paged op
  as any other;
- static_cache_lengths: STATIC_LENGTHS_RULE (a fused decode attention over
  a dense cache whose mask is, or has a term that is, provably "key j kept iff
  j < L + c" (a StaticCache's j <= cache_position) -> the op's lengths-tensor
  wrapper, reading only the valid K/V; the mask dropped when it is only that
  bound). After paged_attention_read, before attention_layout;
- sparse_attention_to_fused: SPARSE_RULE (attention over top-k selected
  tokens, gathered by the indices: DeepSeek-V3.2's DSA in MLA-absorb form ->
  npu_sparse_flash_attention; before the generic attention rules, which would
  otherwise read the gathered keys as a dense batch);
- nsa_compress_attention_to_fused: NSA_RULE (NSA compressed attention over a paged
  compressed KV and its top-k selection blocks -> npu_nsa_compress_attention_infer,
  lengths as a tensor; before the generic attention rules, for the same reason);
- moe_experts_to_fused: MOE_RULE (transformers' sorted-experts MoE block:
  histc/cumsum, grouped_mm_fallback, the inverse permutation -> the NPU's MoE ops);
- moe_router_to_gating: ROUTER_RULE (a router's softmax and top-k, in either
  order -> npu_moe_gating_top_k_softmax_v2; after moe_experts_to_fused, which
  reads the top-k to know the expert ids' range).
advance_step_to_fused (not a rule: it evaluates the values written back into
int64 graph inputs) turns vLLM's torch-only advance_step into
npu_advance_step_flashattn: the plain step, and the speculative one (spec_token,
accepted_num) when its last token is provably the op's. gqa_repeat_kv, attention_layout and
attention_precision refine fused ops the
rules inserted, reading the fused-op registry (registry.py). shared_subexpressions,
last, merges the identical pure nodes the rules built for several sites (every
layer's copy of the mask chain) into one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from ..report import Report
from ._context import PassContext
from ._rules import RuleStats
from .advance_step_to_fused import advance_step_to_fused
from .attention_layout import attention_layout
from .attention_precision import attention_precision
from .attention_sinks_to_fused import SINK_RULE, attention_sinks_to_fused
from .eager_attention_to_fused import EAGER_RULE, eager_attention_to_fused
from .gqa_repeat_kv import gqa_repeat_kv
from .moe_experts_to_fused import MOE_RULE, moe_experts_to_fused
from .moe_router_to_gating import ROUTER_RULE, moe_router_to_gating
from .nsa_compress_attention_to_fused import NSA_RULE, nsa_compress_attention_to_fused
from .packed_prefill_to_tnd import packed_prefill_to_tnd
from .paged_attention_read import PAGED_READ_RULE, paged_attention_read
from .paged_cache_update import PAGED_WRITE_RULE, paged_cache_update
from .shared_subexpressions import shared_subexpressions
from .sdpa_to_fused import SDPA_RULE, sdpa_to_fused
from .sparse_attention_to_fused import SPARSE_RULE, sparse_attention_to_fused
from .sliding_window_cache_update import SLIDING_WINDOW_RULE, WINDOW_FILL_RULE, sliding_window_cache_update
from .static_cache_lengths import STATIC_LENGTHS_RULE, static_cache_lengths
from .static_cache_update import STATIC_WRITE_RULE, static_cache_update
from .training_eager_attention_to_fusion import claim_sites_left_in_training, training_eager_attention_to_fusion
from .training_packed_to_tnd import training_packed_to_tnd
from .training_sdpa_to_fusion import training_sdpa_to_fusion
from .unfused_sites import report_unfused_sites

GraphPass = Callable[[torch.fx.GraphModule, Report, PassContext], "int | RuleStats | None"]

PRE_AOT, POST_AOT = "pre_aot", "post_aot"


@dataclass(frozen=True)
class Pass:
    name: str
    stage: str  # PRE_AOT: dynamo's graph, when gradients are needed; POST_AOT: each ATen graph
    run: GraphPass


# The fixed order.
PIPELINE: tuple[Pass, ...] = (
    Pass("training_sdpa_to_fusion", PRE_AOT, training_sdpa_to_fusion),
    Pass("training_eager_attention_to_fusion", PRE_AOT, training_eager_attention_to_fusion),
    Pass("training_packed_to_tnd", PRE_AOT, training_packed_to_tnd),
    Pass("sdpa_to_fused", POST_AOT, sdpa_to_fused),
    Pass("sparse_attention_to_fused", POST_AOT, sparse_attention_to_fused),
    Pass("nsa_compress_attention_to_fused", POST_AOT, nsa_compress_attention_to_fused),
    Pass("eager_attention_to_fused", POST_AOT, eager_attention_to_fused),
    Pass("attention_sinks_to_fused", POST_AOT, attention_sinks_to_fused),
    Pass("gqa_repeat_kv", POST_AOT, gqa_repeat_kv),
    Pass("static_cache_update", POST_AOT, static_cache_update),
    Pass("sliding_window_cache_update", POST_AOT, sliding_window_cache_update),
    Pass("paged_cache_update", POST_AOT, paged_cache_update),
    # After the attention rules, gqa_repeat_kv and the paged write: retargets their fused op (see the docstring).
    Pass("paged_attention_read", POST_AOT, paged_attention_read),
    # After it: a dense (static) cache's decode attention gets its KV lengths from a mask term (see the module).
    Pass("static_cache_lengths", POST_AOT, static_cache_lengths),
    Pass("advance_step_to_fused", POST_AOT, advance_step_to_fused),
    Pass("moe_experts_to_fused", POST_AOT, moe_experts_to_fused),
    Pass("moe_router_to_gating", POST_AOT, moe_router_to_gating),
    Pass("attention_layout", POST_AOT, attention_layout),
    Pass("attention_precision", POST_AOT, attention_precision),
    # Last: retargets a fused prefill whose mask is proved packed (sequence ids, positions) to its TND wrapper.
    Pass("packed_prefill_to_tnd", POST_AOT, packed_prefill_to_tnd),
    # After every rule: what the rules built alike for several sites (a layer's mask chain), built once.
    Pass("shared_subexpressions", POST_AOT, shared_subexpressions),
)
PASSES: dict[str, Pass] = {p.name: p for p in PIPELINE}
RULES = (SDPA_RULE, EAGER_RULE, SINK_RULE, STATIC_WRITE_RULE, SLIDING_WINDOW_RULE, WINDOW_FILL_RULE, PAGED_WRITE_RULE,
         PAGED_READ_RULE, STATIC_LENGTHS_RULE, MOE_RULE, ROUTER_RULE, SPARSE_RULE, NSA_RULE)


def _run(p: Pass, gm: torch.fx.GraphModule, report: Report, ctx: PassContext) -> None:
    start = time.perf_counter()
    result = p.run(gm, report, ctx)
    report.pass_seconds[p.name] = report.pass_seconds.get(p.name, 0.0) + time.perf_counter() - start
    rewritten = result.rewritten if isinstance(result, RuleStats) else int(result or 0)
    report.pass_rewrites[p.name] = report.pass_rewrites.get(p.name, 0) + rewritten


def run_passes(gm: torch.fx.GraphModule, selected: Iterable[str], report: Report, ctx: PassContext) -> None:
    """The selected post-AOT passes in pipeline order, then the completeness check."""
    chosen = set(selected)
    claim_sites_left_in_training(gm)  # listed already, in the "training" graph
    for p in PIPELINE:
        if p.stage == POST_AOT and p.name in chosen:
            _run(p, gm, report, ctx)
    start = time.perf_counter()
    report_unfused_sites(gm, report, ctx, chosen)
    report.pass_seconds["unfused_sites"] = report.pass_seconds.get("unfused_sites", 0.0) + \
        time.perf_counter() - start


def run_pre_aot_passes(gm: torch.fx.GraphModule, selected: Iterable[str], report: Report,
                       ctx: PassContext) -> None:
    """The selected pre-AOT passes (dynamo's graph of a training step) in pipeline order."""
    chosen = set(selected)
    for p in PIPELINE:
        if p.stage == PRE_AOT and p.name in chosen:
            _run(p, gm, report, ctx)


__all__ = ["PASSES", "PIPELINE", "POST_AOT", "PRE_AOT", "GraphPass", "Pass", "PassContext", "RULES",
           "run_passes", "run_pre_aot_passes"]
