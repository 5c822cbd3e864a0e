"""The one registry of facts about the fused ops the passes insert.

Every pass that inserts, retargets or casts a fused op reads its facts here:
the attention rules choose an op and build its arguments from
AttentionCall, gqa_repeat_kv and attention_layout ask which layouts and K/V
positions an op has, attention_precision asks which arguments are cast, and
the KV-cache rules pick their writers. Validation is not restated here: it is
the op's own fake implementation, which Rewrite.call runs on the site's fake
values before anything is committed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..kernels._library import INT_MAX

npu_attn = torch.ops.npu_attn


@dataclass(frozen=True)
class AttentionCall:
    """One fused attention call in op-neutral terms (SDPA's, with NPU masks)."""

    query: torch.fx.Node
    key: torch.fx.Node
    value: torch.fx.Node
    num_heads: int
    num_key_value_heads: int  # 0 when equal to num_heads (the ops' convention)
    scale: float
    layout: str
    atten_mask: torch.fx.Node | None = None  # bool, True = masked out
    pse_shift: torch.fx.Node | None = None
    sparse_mode: int = 0
    pre_tokens: int = INT_MAX  # sparse_mode 4's band; the other modes ignore them
    next_tokens: int = INT_MAX
    learnable_sink: torch.fx.Node | None = None  # (N,) per query head


@dataclass(frozen=True)
class FusedAttentionOp:
    """Facts about one fused inference attention op."""

    name: str
    overload: torch._ops.OpOverload
    output_index: int | None  # the attention output's index in a tuple result, None: the result itself
    scale_kwarg: str
    # input_layout -> the memory order of its output ("BNSD" or "BSND"): q/k/v are
    # read in the layout's first part, the output is written in the second.
    layouts: dict[str, str]
    sparse_modes: bool  # takes sparse_mode / pre_tokens / next_tokens
    query_len: str  # "one": S_q must be 1; "static": S_q a static int; "any": symbolic too
    key_arg: int = 1
    value_arg: int = 2
    # Floating arguments that take the query's dtype (cast together by attention_precision).
    cast_args: tuple[int, ...] = (0, 1, 2)
    cast_kwargs: tuple[str, ...] = ("pse_shift",)
    heads_kwarg: str = "num_heads"
    sink_kwarg: str | None = None  # the per-head sink logits argument, if the op takes one

    def kwargs(self, call: AttentionCall) -> dict:
        kw: dict[str | None, object] = dict(atten_mask=call.atten_mask, pse_shift=call.pse_shift, input_layout=call.layout,
                  num_key_value_heads=call.num_key_value_heads)
        kw[self.heads_kwarg] = call.num_heads
        kw[self.scale_kwarg] = call.scale
        if call.learnable_sink is not None:
            kw[self.sink_kwarg] = call.learnable_sink
        if self.sparse_modes:
            kw.update(sparse_mode=call.sparse_mode, pre_tokens=call.pre_tokens, next_tokens=call.next_tokens)
        return kw

    def output_memory(self, layout: str) -> str:
        return self.layouts[layout]


PROMPT = FusedAttentionOp(
    name="npu_prompt_flash_attention", overload=npu_attn.npu_prompt_flash_attention.default, output_index=None,
    scale_kwarg="scale_value", layouts={"BNSD": "BNSD", "BSND": "BSND", "BNSD_BSND": "BSND"},
    sparse_modes=True, query_len="static")
INCRE = FusedAttentionOp(
    name="npu_incre_flash_attention", overload=npu_attn.npu_incre_flash_attention.default, output_index=None,
    scale_kwarg="scale_value", layouts={"BNSD": "BNSD", "BSND": "BSND"}, sparse_modes=False, query_len="one")
FUSED_INFER = FusedAttentionOp(
    name="npu_fused_infer_attention_score", overload=npu_attn.npu_fused_infer_attention_score.default,
    output_index=0, scale_kwarg="scale", layouts={"BNSD": "BNSD", "BSND": "BSND", "BNSD_BSND": "BSND"},
    sparse_modes=True, query_len="any")

FUSED_INFER_V2 = FusedAttentionOp(
    name="npu_fused_infer_attention_score_v2", overload=npu_attn.npu_fused_infer_attention_score_v2.default,
    output_index=0, scale_kwarg="softmax_scale", layouts={"BNSD": "BNSD", "BSND": "BSND", "BNSD_BSND": "BSND"},
    sparse_modes=True, query_len="any", heads_kwarg="num_query_heads", sink_kwarg="learnable_sink",
    cast_kwargs=("pse_shift", "learnable_sink"))

# The paged-read rewrite's wrappers (kernels/paged_attention.py): the two ops
# above with block_table, block_size and the KV lengths as a tensor. Their K/V
# are the paged caches themselves, so attention_layout leaves them alone (it
# skips every call with a block_table); attention_precision casts them.
PAGED_INCRE = FusedAttentionOp(
    name="npu_incre_flash_attention_paged", overload=npu_attn.npu_incre_flash_attention_paged.default,
    output_index=None, scale_kwarg="scale_value", layouts={"BNSD": "BNSD", "BSND": "BSND"}, sparse_modes=False,
    query_len="one")
PAGED_FUSED_INFER = FusedAttentionOp(
    name="npu_fused_infer_attention_score_paged", overload=npu_attn.npu_fused_infer_attention_score_paged.default,
    output_index=0, scale_kwarg="scale", layouts={"BNSD": "BNSD", "BSND": "BSND"}, sparse_modes=True,
    query_len="any")
# fused op -> its paged wrapper, with the wrapper's name for the KV lengths
PAGED_WRAPPERS: dict[str, tuple[FusedAttentionOp, str]] = {
    INCRE.name: (PAGED_INCRE, "actual_seq_lengths"),
    PROMPT.name: (PAGED_FUSED_INFER, "actual_seq_lengths_kv"),
    FUSED_INFER.name: (PAGED_FUSED_INFER, "actual_seq_lengths_kv"),
}

ATTENTION_OPS: dict[torch._ops.OpOverload, FusedAttentionOp] = {
    op.overload: op for op in (PROMPT, INCRE, FUSED_INFER, FUSED_INFER_V2, PAGED_INCRE, PAGED_FUSED_INFER)}

# With a single query token the ops ignore sparse_mode and pre/next tokens (the
# incremental path reads the mask only), so a causal or band structure cannot be
# expressed through sparse modes when S_q may be 1.
SPARSE_MODES_NEED_QUERY_LEN_ABOVE_ONE = True


def attention_op_candidates(query_len: object, needs_sparse_mode: bool,
                            needs_sink: bool = False) -> list[FusedAttentionOp]:
    """The ops that can take a site with this query length, in order of preference:
    the incremental op for decode, the prompt op for static prompts, fused_infer
    for a symbolic length; FIA v2, the one op with learnable_sink, for sinks."""
    if needs_sink:
        return [FUSED_INFER_V2]
    if isinstance(query_len, int):
        ops = [INCRE, PROMPT] if query_len == 1 else [PROMPT]
    else:
        ops = [FUSED_INFER]
    return [op for op in ops if op.sparse_modes or not needs_sparse_mode]


@dataclass(frozen=True)
class FusedWriter:
    """A fused KV-cache writer: its in-place op and its functional twin."""

    name: str
    in_place: torch._ops.OpOverload
    functional: torch._ops.OpOverload
    cache_args: tuple[int, ...]  # positions of the cache arguments
    functional_returns_tuple: bool = False
    layout: str = "BNSD"
    extra_kwargs: dict = field(default_factory=dict)


SCATTER_UPDATE = FusedWriter("scatter_update", npu_attn.scatter_update_.default, npu_attn.scatter_update.default,
                             cache_args=(0,))
SCATTER_PA_KV_CACHE = FusedWriter("npu_scatter_pa_kv_cache", npu_attn.npu_scatter_pa_kv_cache.default,
                                  npu_attn.npu_scatter_pa_kv_cache_functional.default, cache_args=(2, 3),
                                  functional_returns_tuple=True, layout="PA(Norm)",
                                  extra_kwargs={"cache_mode": "Norm"})
WRITERS = (SCATTER_UPDATE, SCATTER_PA_KV_CACHE)
WRITER_OPS = {w.in_place: w for w in WRITERS} | {w.functional: w for w in WRITERS}
