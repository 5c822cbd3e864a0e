"""The GE converters (npu_attn_graph.converters) inside the GE graphs the real TorchAir builds.

Each case calls one npu_attn op in a small function, converts it with
``to_ge_graph(..., options={"passes": []})`` (dynamo -> AOT -> TorchAir offline, our
passes off, so the op reaches its converter unchanged) and checks the one GE op of the
expected type: where each input comes from, that every input not listed is unfed, its
attributes, and which of its outputs the graph's NetOutput reads, in order.

How TorchAir writes the graph (what the helpers rely on):

* a Data op's attr ``index`` is its FX placeholder's position; dynamo numbers graph
  inputs in the order the function first reads them, so every function here reads its
  arguments in parameter order (check_data_ops verifies each Data op's recorded meta
  against the argument);
* ``OpDef.input`` holds control edges ("op:-1", listed first) and then one entry per
  ``input_desc``, "" for an unfed optional input; dynamic (list) inputs are named
  ``key0``, ``value0``;
* optional attributes built through TorchAir's ``ge_op`` (ScatterPaKvCache here) are
  left out when they equal GE's IR default (DEFAULT below);
* an input the graph mutates (copy_ into an argument, or an in-place op, which AOT
  turns into auto_functionalized_v2 + copy_) becomes an Assign, which TorchAir folds
  away: the written value becomes an extra NetOutput output that the runtime binds to
  the argument's memory, and for the ref ops TorchAir knows (Scatter, ScatterNdUpdate,
  ScatterPaKvCache) the TensorMove before the ref input is removed, so the op writes
  the argument's Data op directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch

import npu_attn_graph
from npu_attn_graph.torchair_bridge import load_torchair

OPS = torch.ops.npu_attn
F16, I32, I64 = torch.float16, torch.int32, torch.int64
INT64_MAX = 2**63 - 1
CAUSAL_2048 = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)
CONST_DTYPES = {"DT_INT64": torch.int64, "DT_INT32": torch.int32, "DT_FLOAT": torch.float32}


# ----------------------------------------------------------------------------
# What a case expects
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Arg:
    """The Data op of the function's argument `index`, through one `via` op (a copy the
    converter documents, e.g. TensorMove) when given."""

    index: int
    via: str | None = None


@dataclass(frozen=True)
class Const:
    """A Const op holding `value` (a list or a scalar) as GE dtype `dtype`."""

    value: Any
    dtype: str = "DT_INT64"


DEFAULT = "<not written: GE's IR default>"
PLAIN = {"passes": []}  # to_ge_graph's options: our passes off


def plain_options() -> dict:
    return PLAIN


@dataclass
class Case:
    fn: Callable
    args: tuple
    ge_type: str
    inputs: dict[str, Arg | Const]  # every GE input not named here must be unfed
    attrs: dict[str, Any]
    outputs: list[str | Const]  # NetOutput's data inputs, in order: output names of the op (or a Const)
    pinned: bool = False  # the converter calls dont_prune_me: a control edge ties the op to NetOutput
    options: Callable[[], dict] = plain_options  # to_ge_graph's options, made when the test runs


def randn(*shape, dtype=F16):
    return torch.randn(shape).to(dtype)


def moved(index: int) -> Arg:
    return Arg(index, via="TensorMove")


# ----------------------------------------------------------------------------
# Reading the GE graph
# ----------------------------------------------------------------------------


def op_named(graph, name: str):
    return next(op for op in graph.op if op.name == name)


def only_op(graph, op_type: str):
    found = [op for op in graph.op if op.type == op_type]
    assert len(found) == 1, f"{len(found)} {op_type} ops in {sorted(op.type for op in graph.op)}"
    return found[0]


def data_inputs(op) -> list[str]:
    return [src for src in op.input if not src.endswith(":-1")]


def producer(graph, op, input_name: str):
    """(producer op, output index) of `op`'s input `input_name`; None when unfed."""
    names = [desc.name for desc in op.input_desc]
    assert input_name in names, f"{op.type} has no input {input_name!r}: {names}"
    desc = op.input_desc[names.index(input_name)]
    src = data_inputs(op)[names.index(input_name)]
    if not src:
        assert "_is_unfed_optional" in desc.attr, f"{op.type}.{input_name}: empty input not marked unfed"
        return None
    name, index = src.rsplit(":", 1)
    return op_named(graph, name), int(index)


def data_index(op) -> int:
    assert op.type == "Data", f"expected a Data op, got {op.type} {op.name}"
    return op.attr["index"].i


def const_value(op):
    assert op.type == "Const", f"expected a Const op, got {op.type} {op.name}"
    tensor = op.attr["value"].t
    dtype = dtype_name(tensor.desc)
    values = torch.frombuffer(bytearray(tensor.data), dtype=CONST_DTYPES[dtype])
    return dtype, values.reshape(list(tensor.desc.shape.dim)).tolist()


def dtype_name(desc) -> str:
    return type(desc).DESCRIPTOR.fields_by_name["dtype"].enum_type.values_by_number[desc.dtype].name


def attr_value(op, name: str):
    if name not in op.attr:
        return DEFAULT
    attr = op.attr[name]
    kind = attr.WhichOneof("value")
    value = getattr(attr, kind)
    return value.decode() if kind == "s" else value


def output_index(op, name: str) -> int:
    names = [desc.name for desc in op.output_desc]
    assert name in names, f"{op.type} has no output {name!r}: {names}"
    return names.index(name)


def check_data_ops(graph, args) -> None:
    """One Data op per argument, index i holding argument i (its recorded meta matches)."""
    data = {data_index(op): op for op in graph.op if op.type == "Data"}
    assert sorted(data) == list(range(len(args)))
    for index, arg in enumerate(args):
        meta = data[index].output_desc[0].attr["_meta"].s.decode()
        assert meta.startswith(f"Tensor(dtype={arg.dtype}, shape={arg.shape}"), (index, meta)


def check_source(graph, found, want: Arg | Const, where: str) -> None:
    assert found is not None, f"{where} is unfed"
    if isinstance(want, Const):
        assert const_value(found[0]) == (want.dtype, want.value), where
        return
    if want.via is not None:
        via = found[0]
        assert via.type == want.via, f"{where}: from {via.type} {via.name}, expected {want.via}"
        found = producer(graph, via, via.input_desc[0].name)
    src, index = found
    assert src.type == "Data" and index == 0, f"{where}: from {src.type} {src.name}, expected Data {want.index}"
    assert data_index(src) == want.index, where


def convert(case: Case, out_dir):
    with torch.no_grad():
        result = npu_attn_graph.to_ge_graph(case.fn, *case.args, options=case.options(), out_dir=out_dir)
    assert result.single_graph, result.summary()
    return result.graphs[0].graph_def


# ----------------------------------------------------------------------------
# Cases: one per converter and form
# ----------------------------------------------------------------------------


def prompt_flash_attention():
    return Case(
        lambda q, k, v, mask: OPS.npu_prompt_flash_attention(
            q, k, v, atten_mask=mask, actual_seq_lengths=[3, 4], num_heads=4, scale_value=0.25, pre_tokens=3,
            next_tokens=1, input_layout="BNSD", num_key_value_heads=2, actual_seq_lengths_kv=[5, 6], sparse_mode=4),
        (randn(2, 4, 4, 16), randn(2, 2, 6, 16), randn(2, 2, 6, 16), CAUSAL_2048), "PromptFlashAttention",
        inputs=dict(query=Arg(0), key=Arg(1), value=Arg(2), atten_mask=Arg(3), actual_seq_lengths=Const([3, 4]),
                    actual_seq_lengths_kv=Const([5, 6])),
        attrs=dict(num_heads=4, scale_value=0.25, pre_tokens=3, next_tokens=1, input_layout="BNSD",
                   num_key_value_heads=2, sparse_mode=4),
        outputs=["attention_out"])


def incre_flash_attention():
    table = torch.tensor([[0, 3, -1], [5, -1, -1]], dtype=I32)  # paged: 6 blocks of 16 tokens
    return Case(
        lambda q, k, v, mask, table: OPS.npu_incre_flash_attention(
            q, k, v, atten_mask=mask, actual_seq_lengths=[20, 7], block_table=table, num_heads=4,
            scale_value=0.125, input_layout="BSH", num_key_value_heads=2, block_size=16, inner_precise=0),
        (randn(2, 1, 64), randn(6, 16, 32), randn(6, 16, 32), torch.zeros(2, 1, 1, 48, dtype=torch.bool), table),
        "IncreFlashAttention",
        inputs=dict(query=Arg(0), key0=Arg(1), value0=Arg(2), atten_mask=Arg(3), block_table=Arg(4),
                    actual_seq_lengths=Const([20, 7])),
        attrs=dict(num_heads=4, scale_value=0.125, input_layout="BSH", num_key_value_heads=2, block_size=16,
                   inner_precise=0),
        outputs=["attention_out"])


def fused_infer_attention_score():
    return Case(
        lambda q, k, v, mask: OPS.npu_fused_infer_attention_score(
            q, k, v, atten_mask=mask, actual_seq_lengths=[5, 3], actual_seq_lengths_kv=[9, 6], num_heads=4,
            scale=0.375, pre_tokens=1000, next_tokens=0, input_layout="BNSD", num_key_value_heads=2,
            sparse_mode=3, inner_precise=2, softmax_lse_flag=True),
        (randn(2, 4, 5, 16), randn(2, 2, 9, 16), randn(2, 2, 9, 16), CAUSAL_2048), "FusedInferAttentionScore",
        inputs=dict(query=Arg(0), key0=Arg(1), value0=Arg(2), atten_mask=Arg(3), actual_seq_lengths=Const([5, 3]),
                    actual_seq_lengths_kv=Const([9, 6])),
        attrs=dict(num_heads=4, scale=0.375, pre_tokens=1000, next_tokens=0, input_layout="BNSD",
                   num_key_value_heads=2, sparse_mode=3, inner_precise=2, softmax_lse_flag=True),
        outputs=["attention_out", "softmax_lse"])


def fused_infer_attention_score_v2_sink():
    """TND + GQA + rightDownCausal with learnable_sink (bfloat16 (N,)) and softmax_lse."""
    return Case(
        lambda q, k, v, mask, sink: OPS.npu_fused_infer_attention_score_v2(
            q, k, v, atten_mask=mask, actual_seq_qlen=[4, 9], actual_seq_kvlen=[5, 12], learnable_sink=sink,
            num_query_heads=4, num_key_value_heads=2, softmax_scale=0.375, pre_tokens=1000, next_tokens=0,
            input_layout="TND", sparse_mode=3, inner_precise=2, return_softmax_lse=True),
        (randn(9, 4, 64), randn(12, 2, 64), randn(12, 2, 64), CAUSAL_2048, randn(4, dtype=torch.bfloat16)),
        "FusedInferAttentionScore",
        inputs=dict(query=Arg(0), key0=Arg(1), value0=Arg(2), atten_mask=Arg(3), learnable_sink=Arg(4),
                    actual_seq_lengths=Const([4, 9]), actual_seq_lengths_kv=Const([5, 12])),
        attrs=dict(num_heads=4, scale=0.375, pre_tokens=1000, next_tokens=0, input_layout="TND",
                   num_key_value_heads=2, sparse_mode=3, inner_precise=2, softmax_lse_flag=True,
                   antiquant_mode=0, key_antiquant_mode=0, value_antiquant_mode=0, query_quant_mode=0, pse_type=0,
                   out_dtype=DEFAULT),
        outputs=["attention_out", "softmax_lse"])


def fused_infer_attention_score_v2_renamed():
    """The renamed quantisation inputs: int8 KV with per-token dequant scales/offsets
    (dequant_* -> key/value_antiquant_*, key/value_quant_mode -> key/value_antiquant_mode)
    and an int8 output (quant_scale_out/quant_offset_out -> quant_scale2/quant_offset2)."""
    kv = lambda: torch.randint(-128, 128, (2, 2, 8, 32), dtype=torch.int8)  # noqa: E731
    per_token = lambda: torch.rand(2, 8)  # noqa: E731
    return Case(
        lambda q, k, v, ks, ko, vs, vo, qs, qo, pse: OPS.npu_fused_infer_attention_score_v2(
            q, k, v, dequant_scale_key=ks, dequant_offset_key=ko, dequant_scale_value=vs, dequant_offset_value=vo,
            quant_scale_out=qs, quant_offset_out=qo, pse_shift=pse, actual_seq_kvlen=[8, 5], num_query_heads=4,
            num_key_value_heads=2, softmax_scale=0.25, input_layout="BNSD", key_quant_mode=1,
            value_quant_mode=1, inner_precise=1),
        (randn(2, 4, 1, 32), kv(), kv(), per_token(), per_token(), per_token(), per_token(),
         torch.tensor([20.0]), torch.tensor([1.0]), randn(2, 4, 1, 8)),
        "FusedInferAttentionScore",
        inputs=dict(query=Arg(0), key0=Arg(1), value0=Arg(2), key_antiquant_scale=Arg(3),
                    key_antiquant_offset=Arg(4), value_antiquant_scale=Arg(5), value_antiquant_offset=Arg(6),
                    quant_scale2=Arg(7), quant_offset2=Arg(8), pse_shift=Arg(9), actual_seq_lengths_kv=Const([8, 5])),
        attrs=dict(num_heads=4, scale=0.25, input_layout="BNSD", num_key_value_heads=2, inner_precise=1,
                   softmax_lse_flag=False, antiquant_mode=0, key_antiquant_mode=1, value_antiquant_mode=1,
                   query_quant_mode=0, pse_type=0, out_dtype=DEFAULT),
        outputs=["attention_out", "softmax_lse"])


FUSION_KW = dict(pre_tockens=65536, next_tockens=0, inner_precise=2, actual_seq_qlen=[4, 9],
                 actual_seq_kvlen=[5, 12], sparse_mode=3)  # TND, rightDownCausal
FUSION_ATTRS = dict(head_num=4, input_layout="TND", scale_value=0.375, keep_prob=1.0, pre_tockens=65536,
                    next_tockens=0, inner_precise=2, sparse_mode=3)
FUSION_INPUTS = dict(query=Arg(0), key=Arg(1), value=Arg(2), actual_seq_qlen=Const([4, 9]),
                     actual_seq_kvlen=Const([5, 12]))


def fusion_qkv():
    return randn(9, 4, 16), randn(12, 2, 16), randn(12, 2, 16)


def fusion_attention():
    return Case(
        # the first four results: (attention_out, softmax_max, softmax_sum, softmax_out)
        lambda q, k, v, mask: OPS.npu_fusion_attention(q, k, v, 4, "TND", atten_mask=mask, scale=0.375,
                                                       **FUSION_KW)[:4],
        (*fusion_qkv(), CAUSAL_2048), "FlashAttentionScore",
        inputs=dict(FUSION_INPUTS, atten_mask=Arg(3)), attrs=FUSION_ATTRS,
        outputs=["attention_out", "softmax_max", "softmax_sum", "softmax_out"])


def fusion_attention_pse():
    """BNSD with a positional bias: pse feeds FlashAttentionScore's real_shift."""
    q, k, v = (randn(1, 2, 16, 16) for _ in range(3))
    return Case(
        lambda q, k, v, pse: OPS.npu_fusion_attention(q, k, v, 2, "BNSD", pse=pse, scale=0.25)[:1],
        (q, k, v, randn(1, 2, 16, 16)), "FlashAttentionScore",
        inputs=dict(query=Arg(0), key=Arg(1), value=Arg(2), real_shift=Arg(3)),
        attrs=dict(head_num=2, input_layout="BNSD", scale_value=0.25, sparse_mode=0),
        outputs=["attention_out"])


def fusion_attention_grad():
    q, k, v = fusion_qkv()
    out, softmax_max, softmax_sum, *_ = OPS.npu_fusion_attention(q, k, v, 4, "TND", atten_mask=CAUSAL_2048,
                                                                 scale=0.375, **FUSION_KW)
    return Case(
        lambda q, k, v, dy, mask, smax, ssum, out: OPS.npu_fusion_attention_grad(
            q, k, v, dy, 4, "TND", atten_mask=mask, softmax_max=smax, softmax_sum=ssum, attention_in=out,
            scale_value=0.375, **FUSION_KW),
        (q, k, v, torch.randn_like(out), CAUSAL_2048, softmax_max, softmax_sum, out), "FlashAttentionScoreGrad",
        inputs=dict(FUSION_INPUTS, dy=Arg(3), atten_mask=Arg(4), softmax_max=Arg(5), softmax_sum=Arg(6),
                    attention_in=Arg(7)),
        attrs=FUSION_ATTRS,
        outputs=["dq", "dk", "dv", "dpse", Const(0.0, "DT_FLOAT")])  # dsink: a float32 zero


def reinplace_options() -> dict:
    """Our passes off; a user post_grad pass (run where ours would) that rewrites
    ``copy_(x, F(x, ..))`` (also through AOT's ``copy(x, ..)``) into ``F_(x, ..)``: the only way
    an FX graph holds scatter_update_ / npu_scatter_nd_update_ after AOT."""
    inplace = {OPS.scatter_update.default: OPS.scatter_update_.default,
               OPS.npu_scatter_nd_update.default: OPS.npu_scatter_nd_update_.default}

    def reinplace(gm: torch.fx.GraphModule, example_inputs, config) -> None:
        for copy_ in [n for n in gm.graph.nodes if n.target is torch.ops.aten.copy_.default]:
            dst, src = copy_.args
            chain = [copy_]
            if src.target is torch.ops.aten.copy.default and src.args[0] is dst:
                chain.append(src)
                src = src.args[1]
            if src.target in inplace and src.args[0] is dst:
                with gm.graph.inserting_before(copy_):
                    node = gm.graph.call_function(inplace[src.target], src.args, src.kwargs)
                node.meta.update(src.meta)
                copy_.replace_all_uses_with(node)
                for dead in [*chain, src]:
                    gm.graph.erase_node(dead)
        gm.recompile()

    config = load_torchair().module.CompilerConfig()
    config.post_grad_custom_pre_pass = reinplace
    return {"passes": [], "torchair_config": config}


def scatter(op: str, form: str):
    """scatter_update / npu_scatter_nd_update: GE Scatter / ScatterNdUpdate, a ref op on var.

    form "functional": the result returned (var = the converter's TensorMove copy);
    "copy_back": the result copied into self (TorchAir drops the TensorMove, var = self);
    "inplace": the in-place op called (tagged inplace: AOT functionalizes it, and TorchAir
    makes the write in place on self);
    "reinplaced": the in-place op put into the post-grad graph by a user pass."""
    if op == "scatter_update":
        args = (randn(2, 3, 8, 4), torch.tensor([5, 1], dtype=I64), randn(2, 3, 1, 4))
        ge_type, attrs, extra = "Scatter", dict(reduce="update", axis=2), (2,)  # extra: axis
    else:
        args = (randn(4, 5, 6), torch.tensor([[0, 1], [3, 4], [2, 0]], dtype=I64), randn(3, 6))
        ge_type, attrs, extra = "ScatterNdUpdate", dict(use_locking=False), ()
    functional, inplace = getattr(OPS, op), getattr(OPS, op + "_")

    def returned(x, i, u):
        return functional(x, i, u, *extra)

    def copy_back(x, i, u):
        x.copy_(functional(x, i, u, *extra))

    def call_inplace(x, i, u):
        inplace(x, i, u, *extra)

    fn, var, pinned, options = {
        "functional": (returned, moved(0), False, plain_options),
        "copy_back": (copy_back, Arg(0), False, plain_options),
        "inplace": (call_inplace, Arg(0), True, plain_options),
        "reinplaced": (copy_back, Arg(0), True, reinplace_options),
    }[form]
    outputs = [] if form == "reinplaced" else ["var"]  # copy_back/inplace: var is bound to self's memory
    return Case(fn, args, ge_type, inputs=dict(var=var, indices=Arg(1), updates=Arg(2)), attrs=attrs,
                outputs=outputs, pinned=pinned, options=options)


def pa_kv_cache_functional():
    """With the compressed-write inputs; cache_mode None means the ND layout ("Norm",
    GE's default, so the attribute is not written), as in torch_npu."""
    slots = torch.tensor([[0, 8], [16, 24], [32, 40]], dtype=I32)
    lens = torch.tensor([[2, 5], [7, 0], [3, 1]], dtype=I32)
    offsets = torch.tensor([1, 0, -1, 3, 3, 0], dtype=I32)
    seq_lens = torch.tensor([5, 7, 3], dtype=I32)
    return Case(
        lambda k, v, kc, vc, slots, lens, offs, seq: OPS.npu_scatter_pa_kv_cache_functional(
            k, v, kc, vc, slots, compress_lens=lens, compress_seq_offsets=offs, seq_lens=seq, cache_mode=None),
        (randn(15, 2, 8), randn(15, 2, 16), randn(6, 8, 1, 8), randn(6, 8, 1, 16), slots, lens, offsets,
         seq_lens), "ScatterPaKvCache",
        inputs=dict(key=Arg(0), value=Arg(1), key_cache=moved(2), value_cache=moved(3), slot_mapping=Arg(4),
                    compress_lens=Arg(5), compress_seq_offset=Arg(6), seq_lens=Arg(7)),
        attrs=dict(cache_mode=DEFAULT, scatter_mode=DEFAULT, strides=DEFAULT, offsets=DEFAULT),
        outputs=["key_cache", "value_cache"])


def pa_kv_cache(form: str):
    """Norm caches written back ("copy_back": functional op + copy_; "inplace": the in-place
    op, through auto_functionalized_v2): both caches become ref outputs bound to the
    arguments, no TensorMove left. cache_mode "Norm" is GE's default: not written."""
    def copy_back(k, v, kc, vc, slots):
        new_kc, new_vc = OPS.npu_scatter_pa_kv_cache_functional(k, v, kc, vc, slots, cache_mode="Norm")
        kc.copy_(new_kc)
        vc.copy_(new_vc)

    def inplace(k, v, kc, vc, slots):
        OPS.npu_scatter_pa_kv_cache(k, v, kc, vc, slots, cache_mode="Norm")

    return Case(
        copy_back if form == "copy_back" else inplace,
        (randn(5, 2, 16), randn(5, 2, 32), randn(4, 8, 2, 16), randn(4, 8, 2, 32),
         torch.tensor([3, 9, 17, 0, 30], dtype=I32)), "ScatterPaKvCache",
        inputs=dict(key=Arg(0), value=Arg(1), key_cache=Arg(2), value_cache=Arg(3), slot_mapping=Arg(4)),
        attrs=dict(cache_mode=DEFAULT, scatter_mode=DEFAULT, strides=DEFAULT, offsets=DEFAULT),
        outputs=["key_cache", "value_cache"], pinned=form == "inplace")


def advance_step_flashattn(speculative: bool):
    """In place (auto_functionalized_v2). TorchAir keeps the TensorMove copies before the
    four ref inputs: AdvanceStep is not in the ref-op table of its
    optimize_reference_op_redundant_copy pass. The four outputs are bound to the arguments."""
    if speculative:  # 3 requests, 2 draft tokens each
        args = (torch.zeros(3, 3, dtype=I64), torch.tensor([[7, 8, -1], [-1, -1, -1], [4, 5, 6]], dtype=I64),
                torch.tensor([[2, 3, 4], [0, 1, 2], [5, 6, 7]], dtype=I64),
                torch.tensor([[3, 4, 5], [1, 2, 3], [6, 7, 8]], dtype=I64), torch.zeros(9, dtype=I64),
                torch.arange(12, dtype=I64).reshape(3, 4), torch.tensor([[31, 32], [41, 42], [51, 52]], dtype=I64),
                torch.tensor([1, 0, 2], dtype=I64))
        sizes = (3, 3, 4)
    else:  # 4 sequences, 3 live
        args = (torch.tensor([1, 2, 3, 4], dtype=I64), torch.tensor([[7], [8], [9]], dtype=I64),
                torch.tensor([0, 1, 2, 0], dtype=I64), torch.tensor([3, 5, 2, 1], dtype=I64),
                torch.zeros(4, dtype=I64), torch.arange(16, dtype=I64).reshape(4, 4))
        sizes = (4, 3, 4)

    def step(tokens, sampled, positions, seq_lens, slots, tables, spec=None, accepted=None):
        OPS.npu_advance_step_flashattn(tokens, sampled, positions, seq_lens, slots, tables, *sizes,
                                       spec_token=spec, accepted_num=accepted)

    inputs = dict(input_tokens=moved(0), sampled_token_ids=Arg(1), input_positions=moved(2), seq_lens=moved(3),
                  slot_mapping=moved(4), block_tables=Arg(5))
    if speculative:
        inputs.update(spec_token=Arg(6), accepted_num=Arg(7))
    return Case(step, args, "AdvanceStep", inputs=inputs,
                attrs=dict(num_seqs=sizes[0], num_queries=sizes[1], block_size=sizes[2]),
                outputs=["input_tokens", "input_positions", "seq_lens", "slot_mapping"], pinned=True)


def nsa_compress_attention_infer():
    table = torch.tensor([[0, 3], [1, -1]], dtype=I32)  # pages of 16 compressed tokens
    return Case(
        lambda q, k, v, table: OPS.npu_nsa_compress_attention_infer(
            q, k, v, 0.125, 4, 2, 64, 2, 16, 32, 16, layout="TND", block_table=table, actual_cmp_seq_kvlen=[20, 12]),
        (randn(2, 4, 32), randn(5, 16, 64), randn(5, 16, 32), table), "NsaCompressAttentionInfer",
        inputs=dict(query=Arg(0), key=Arg(1), value=Arg(2), blockTableOptional=Arg(3),
                    actualCmpKvSeqLenOptional=Const([20, 12])),
        attrs=dict(scaleValue=0.125, numHeads=4, numKeyValueHeads=2, selectBlockSize=64, selectBlockCount=2,
                   pageBlockSize=16, compressBlockSize=32, compressStride=16, layoutOptional="TND", sparseMode=0),
        outputs=["output", "topkIndicesOut"])


def sparse_flash_attention():
    """MLA form: value None, so key feeds GE's value too; paged KV with rope parts and sinks."""
    return Case(
        lambda q, k, idx, table, q_lens, kv_lens, q_rope, k_rope, sinks: OPS.npu_sparse_flash_attention(
            q, k, None, idx, 0.0625, block_table=table, actual_seq_lengths_query=q_lens,
            actual_seq_lengths_kv=kv_lens, query_rope=q_rope, key_rope=k_rope, sparse_block_size=4,
            layout_query="BSND", layout_kv="PA_BSND", sparse_mode=0, attention_mode=2, sinks=sinks),
        (randn(2, 3, 4, 512), randn(6, 16, 1, 512), torch.tensor([[[[0, 1, -1]]] * 3] * 2, dtype=I32),
         torch.tensor([[0, 2], [5, -1]], dtype=I32), torch.tensor([3, 2], dtype=I32),
         torch.tensor([20, 7], dtype=I32), randn(2, 3, 4, 64), randn(6, 16, 1, 64), torch.randn(4)),
        "SparseFlashAttention",
        inputs=dict(query=Arg(0), key=Arg(1), value=Arg(1), sparse_indices=Arg(2), block_table=Arg(3),
                    actual_seq_lengths_query=Arg(4), actual_seq_lengths_kv=Arg(5), query_rope=Arg(6),
                    key_rope=Arg(7), sinks=Arg(8)),
        attrs=dict(scale_value=0.0625, sparse_block_size=4, layout_query="BSND", layout_kv="PA_BSND",
                   sparse_mode=0, pre_tokens=INT64_MAX, next_tokens=INT64_MAX, attention_mode=2,
                   return_softmax_lse=False),
        outputs=["attention_out", "softmax_max", "softmax_sum"])


def _sfa_bsnd_inputs():
    return (randn(2, 3, 4, 512), randn(2, 8, 1, 512), torch.tensor([[[[0, 1, -1]]] * 3] * 2, dtype=I32),
            randn(2, 3, 4, 64), randn(2, 8, 1, 64))


def sparse_flash_attention_default_mode():
    """The 2.13 schema's default attention_mode=0 (with rope parts: MLA-absorb): written as 2,
    the only mode CANN's SparseFlashAttention runs."""
    return Case(
        lambda q, k, idx, q_rope, k_rope: OPS.npu_sparse_flash_attention(
            q, k, None, idx, 0.0625, query_rope=q_rope, key_rope=k_rope),
        _sfa_bsnd_inputs(),
        "SparseFlashAttention",
        inputs=dict(query=Arg(0), key=Arg(1), value=Arg(1), sparse_indices=Arg(2), query_rope=Arg(3),
                    key_rope=Arg(4)),
        attrs=dict(scale_value=0.0625, sparse_block_size=1, layout_query="BSND", layout_kv="BSND", sparse_mode=3,
                   pre_tokens=INT64_MAX, next_tokens=INT64_MAX, attention_mode=2, return_softmax_lse=False),
        outputs=["attention_out", "softmax_max", "softmax_sum"])


def custom_sparse_flash_attention():
    """Seed 004's custom form: the same GE op (attention_mode 2), its one output read."""
    from npu_attn_graph.ops import custom

    return Case(
        lambda q, k, idx, q_rope, k_rope: custom.npu_sparse_flash_attention(
            q, k, k, idx, 0.0625, 2, query_rope=q_rope, key_rope=k_rope, sparse_mode=0),
        _sfa_bsnd_inputs(),
        "SparseFlashAttention",
        inputs=dict(query=Arg(0), key=Arg(1), value=Arg(1), sparse_indices=Arg(2), query_rope=Arg(3),
                    key_rope=Arg(4)),
        attrs=dict(scale_value=0.0625, sparse_block_size=2, layout_query="BSND", layout_kv="BSND", sparse_mode=0,
                   attention_mode=2, return_softmax_lse=False),
        outputs=["attention_out"])


CASES = [
    pytest.param(prompt_flash_attention, id="prompt_flash_attention"),
    pytest.param(incre_flash_attention, id="incre_flash_attention"),
    pytest.param(fused_infer_attention_score, id="fused_infer_attention_score"),
    pytest.param(fused_infer_attention_score_v2_sink, id="fused_infer_attention_score_v2-sink"),
    pytest.param(fused_infer_attention_score_v2_renamed, id="fused_infer_attention_score_v2-renamed_quant"),
    pytest.param(fusion_attention, id="fusion_attention"),
    pytest.param(fusion_attention_pse, id="fusion_attention-pse"),
    pytest.param(fusion_attention_grad, id="fusion_attention_grad"),
    *[pytest.param(lambda op=op, form=form: scatter(op, form), id=name)
      for op in ("scatter_update", "npu_scatter_nd_update")
      for form, name in (("functional", op), ("copy_back", f"{op}-copy_back"), ("inplace", f"{op}_"),
                         ("reinplaced", f"{op}_-reinplaced_by_pass"))],
    pytest.param(pa_kv_cache_functional, id="npu_scatter_pa_kv_cache_functional"),
    pytest.param(lambda: pa_kv_cache("copy_back"), id="npu_scatter_pa_kv_cache_functional-copy_back"),
    pytest.param(lambda: pa_kv_cache("inplace"), id="npu_scatter_pa_kv_cache"),
    pytest.param(lambda: advance_step_flashattn(False), id="npu_advance_step_flashattn"),
    pytest.param(lambda: advance_step_flashattn(True), id="npu_advance_step_flashattn-speculative"),
    pytest.param(nsa_compress_attention_infer, id="npu_nsa_compress_attention_infer"),
    pytest.param(sparse_flash_attention, id="npu_sparse_flash_attention"),
    pytest.param(sparse_flash_attention_default_mode, id="npu_sparse_flash_attention-attention_mode_0"),
    pytest.param(custom_sparse_flash_attention, id="custom.npu_sparse_flash_attention"),
]


@pytest.mark.parametrize("build", CASES)
def test_ge_converter(build, tmp_path):
    torch.manual_seed(0)
    case = build()
    graph = convert(case, tmp_path)
    op = only_op(graph, case.ge_type)
    check_data_ops(graph, case.args)

    for name, want in case.inputs.items():
        check_source(graph, producer(graph, op, name), want, f"{op.type}.{name}")
    fed = {desc.name: producer(graph, op, desc.name) for desc in op.input_desc if desc.name not in case.inputs}
    assert {name: src for name, src in fed.items() if src is not None} == {}, "inputs fed that the call left out"

    assert {name: attr_value(op, name) for name in case.attrs} == case.attrs

    net_output = only_op(graph, "NetOutput")
    results = data_inputs(net_output)
    assert len(results) == len(case.outputs), (results, case.outputs)
    for index, (src, want) in enumerate(zip(results, case.outputs)):
        if isinstance(want, Const):
            name, _ = src.rsplit(":", 1)
            assert const_value(op_named(graph, name)) == (want.dtype, want.value), f"NetOutput {index}"
        else:
            assert src == f"{op.name}:{output_index(op, want)}", f"NetOutput {index}: {src}, expected {want}"
    assert (f"{op.name}:-1" in net_output.input) == case.pinned, list(net_output.input)


def test_fusion_attention_dropout_without_mask_is_reported_unconverted(tmp_path):
    q, k, v = fusion_qkv()
    with torch.no_grad():
        result = npu_attn_graph.to_ge_graph(
            lambda q, k, v: OPS.npu_fusion_attention(q, k, v, 4, "TND", keep_prob=0.5, **FUSION_KW)[0], q, k, v,
            options=PLAIN, out_dir=tmp_path)
    assert not result.failures, result.failures
    [node] = result.unconverted
    assert node.target == "npu_attn.npu_fusion_attention.default"
    assert "keep_prob=0.5" in node.reason and "dropout" in node.reason
