"""Sparse attention written in plain PyTorch -> the seeds' sparse ops (issue 13, section 1).

DSA (DeepSeek-V3.2's sparse attention) as a model author writes it from the paper: a
lightning indexer scores every key for every query (ReLU'd per-head dot products,
weighted and summed over the indexer heads), future keys are masked, top-k picks K
keys per query, the MLA-absorbed latent cache (512 wide, shared by key and value) and
the rope keys (64 wide) are gathered by those indices, and softmax attention runs over
the gathered keys with the causal rule applied to the indices again. The backend must
turn it into npu_sparse_flash_attention (passes/sparse_attention_to_fused.py) and leave
every decoy alone with a reason that names what differs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import npu_attn_graph
from npu_attn_graph import Report

sys.path.insert(0, str(Path(__file__).parent))

D, R = 512, 64  # latent (kv_lora_rank) and rope widths: the op's D and Dr
PATTERN = "sparse:topk-gather-attention"


class LightningIndexer(torch.nn.Module):
    """DSA's indexer: I[t, s] = sum_j w[t, j] * relu(q_I[t, j] . k_I[s])."""

    def __init__(self, dim: int, heads: int = 2, head_dim: int = 16) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.wq = torch.nn.Linear(dim, heads * head_dim, bias=False)
        self.wk = torch.nn.Linear(dim, head_dim, bias=False)
        self.weights = torch.nn.Linear(dim, heads, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, self.heads, self.head_dim)
        k = self.wk(x)
        scores = torch.relu(torch.einsum("bshd,btd->bsht", q, k))
        return torch.einsum("bsht,bsh->bst", scores, self.weights(x))  # (B, S, T)


class SparseMLA(torch.nn.Module):
    """MLA-absorb attention over the top-k keys the indexer selects (prefill, S queries over S keys).

    spelling: "gather" (torch.gather of the expanded cache), "index" (cache[arange(B)[:, None, None], idx]),
    "matmul" (gather, scores by q @ k^T instead of einsum). causal: mask the future in the indexer and in
    the attention (index > s + offset); without it every selected key counts.
    """

    def __init__(self, dim: int = 32, heads: int = 2, top_k: int = 4, spelling: str = "gather",
                 causal: bool = True, offset: int = 0, fill: float = float("-inf"), mask_indexer: bool = True,
                 indices_from_input: bool = False, positions_from_input: bool = False) -> None:
        super().__init__()
        self.heads, self.top_k, self.spelling, self.causal = heads, top_k, spelling, causal
        self.offset, self.fill, self.mask_indexer = offset, fill, mask_indexer
        self.indices_from_input, self.positions_from_input = indices_from_input, positions_from_input
        self.indexer = LightningIndexer(dim)
        self.wq = torch.nn.Linear(dim, heads * D, bias=False)  # absorbed: q already in the latent space
        self.wq_pe = torch.nn.Linear(dim, heads * R, bias=False)
        self.wkv = torch.nn.Linear(dim, D, bias=False)
        self.wk_pe = torch.nn.Linear(dim, R, bias=False)
        self.scale = (D + R) ** -0.5

    def gather(self, cache: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        b, s, k = idx.shape
        if self.spelling == "index":
            return cache[torch.arange(b, device=cache.device)[:, None, None], idx]
        return torch.gather(cache[:, None].expand(-1, s, -1, -1), 2, idx[..., None].expand(-1, -1, -1,
                                                                                          cache.shape[-1]))

    def forward(self, x: torch.Tensor, idx: torch.Tensor | None = None, positions: torch.Tensor | None = None):
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, self.heads, D)
        q_pe = self.wq_pe(x).view(b, s, self.heads, R)
        kv, k_pe = self.wkv(x), self.wk_pe(x)  # (B, T, D), (B, T, R): one latent cache, key and value
        pos = positions if self.positions_from_input else torch.arange(s, device=x.device)
        if not self.indices_from_input:
            index_scores = self.indexer(x)
            if self.mask_indexer:
                index_scores = index_scores.masked_fill(pos[None, :] > pos[:, None], float("-inf"))
            idx = index_scores.topk(self.top_k, dim=-1).indices  # (B, S, K)
        kv_sel, pe_sel = self.gather(kv, idx), self.gather(k_pe, idx)
        if self.spelling == "matmul":
            scores = q @ kv_sel.transpose(-1, -2) + q_pe @ pe_sel.transpose(-1, -2)  # (B, S, H, K)
        else:
            scores = torch.einsum("bshc,bskc->bshk", q, kv_sel) + torch.einsum("bshr,bskr->bshk", q_pe, pe_sel)
        scores = scores * self.scale
        if self.causal:
            scores = scores.masked_fill((idx > pos[None, :, None] + self.offset)[:, :, None, :], self.fill)
        probs = scores.float().softmax(-1).to(q.dtype)
        if self.spelling == "matmul":
            out = probs @ kv_sel
        else:
            out = torch.einsum("bshk,bskc->bshc", probs, kv_sel)
        return out.reshape(b, s, self.heads * D)


def _model(dtype=torch.float32, seed: int = 0, **kwargs) -> SparseMLA:
    torch.manual_seed(seed)
    return SparseMLA(**kwargs).to(dtype).eval()


def _x(dtype=torch.float32, b: int = 2, s: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, s, 32, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _compiled(model, *args, report: Report):
    with torch.no_grad():
        return torch.compile(model, backend="npu_attn", fullgraph=True,
                             options={"executor": "eager", "report": report})(*args)


def _sites(report: Report):
    return [s for s in report.sites if s.kind == "attention"]


def _code(report: Report) -> str:
    return "\n".join(report.code_after)


# ----------------------------------------------------------------------------
# Rewritten: the op in the graph, values equal eager
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("spelling", ["gather", "index", "matmul"])
@pytest.mark.parametrize("causal", [True, False])
def test_dsa_attention_becomes_sparse_flash_attention(spelling, causal):
    model = _model(spelling=spelling, causal=causal, mask_indexer=causal)
    x = _x()
    with torch.no_grad():
        eager = model(x)
    report = Report()
    out = _compiled(model, x, report=report)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    (site,) = _sites(report)
    assert site.rewritten and site.fused_op == "npu_sparse_flash_attention", report.table()
    assert site.pattern == PATTERN and site.layout == "BSND" and site.sparse_mode == (3 if causal else 0)
    code = _code(report)
    assert "npu_attn.npu_sparse_flash_attention.default" in code
    # Only the indexer's two products remain (its einsums); the attention's three are gone with the gathers.
    assert "aten._softmax" not in code and code.count("aten.bmm.default(") == 2, code
    assert "aten.gather" not in code and "aten.index.Tensor" not in code, code
    assert ("aten.sort.default" in code) == causal


def test_unmasked_indexer_rows_with_no_valid_index_are_nan_as_in_eager():
    """The indexer does not mask the future: a row can select only future keys (eager: softmax of -inf
    = NaN; the op: 0). The rewrite's fix-up gives NaN back, and the top-k order (future keys first) does
    not drop a valid key: the indices are sorted for the op's causal walk."""
    model = _model(causal=True, mask_indexer=False, top_k=2)
    x = _x(s=12)
    with torch.no_grad():
        eager = model(x)
    assert torch.isnan(eager).any() and not torch.isnan(eager).all(), "the case must have empty rows"
    report = Report()
    out = _compiled(model, x, report=report)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6, equal_nan=True)
    (site,) = _sites(report)
    assert site.rewritten and any("NaN" in n for n in site.notes), report.table()


def test_the_indexers_order_does_not_matter():
    """Valid indices placed after future ones (top-k of an unmasked indexer, K > valid count): every
    row still equals eager, since the rewrite sorts the indices before the op's causal walk."""
    model = _model(causal=True, mask_indexer=False, top_k=6)
    x = _x(s=8, seed=5)
    with torch.no_grad():
        eager = model(x)
    report = Report()
    out = _compiled(model, x, report=report)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert _sites(report)[0].rewritten, report.table()


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_half_precision_within_one_output_ulp(dtype, tol):
    """fp16/bf16: eager rounds the scores to the input dtype after each product, the reference kernel
    accumulates in fp32 and rounds once, so the two differ by about one output ulp (the tolerances of the
    op tests: 2e-3 / 1.6e-2 relative)."""
    model = _model(dtype)
    x = _x(dtype)
    with torch.no_grad():
        eager = model(x)
        exact = _model(torch.float64)(x.double())
    report = Report()
    out = _compiled(model, x, report=report)
    assert _sites(report)[0].rewritten, report.table()
    torch.testing.assert_close(out.double(), exact, rtol=tol, atol=tol)
    torch.testing.assert_close(eager.double(), exact, rtol=4 * tol, atol=4 * tol)


def test_ge_target_rewrite_runs_equal_to_eager():
    """The rewrite as made for TorchAir (the GE target: the NPU's dtype rules), run by torch."""
    from fuzz.oracle import ge_target_backend

    model, x = _model(torch.float16), _x(torch.float16)
    report = Report()
    with torch.no_grad():
        eager = model(x)
        out = torch.compile(model, backend=ge_target_backend(report), fullgraph=True)(x)
    (site,) = _sites(report)
    assert site.rewritten and site.fused_op == "npu_sparse_flash_attention", report.table()
    torch.testing.assert_close(out, eager, rtol=2e-3, atol=2e-3)


def test_ge_target_refuses_float32_with_the_ops_message():
    """fp32_attention 'keep' (the oracle's GE target): the op's own NPU dtype rule refuses float32. Before
    the kernel validated with npu_rules_apply, it checked only query.device, and a float32 op reached GE."""
    from fuzz.oracle import ge_target_backend

    model, x = _model(), _x()
    report = Report()
    with torch.no_grad():
        eager = model(x)
        out = torch.compile(model, backend=ge_target_backend(report), fullgraph=True)(x)
    torch.testing.assert_close(out, eager)
    (site,) = _sites(report)
    assert not site.rewritten and "npu_sparse_flash_attention: query.dtype must be one of" in site.reason, \
        report.table()


def test_ge_target_float32_is_computed_in_float16_with_casts():
    """The GE default fp32_attention='float16': casts around the op, the precision column says so."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    from npu_attn_graph.passes import PASSES, PassContext, run_passes

    report = Report()

    def compiler(gm, example_inputs):
        run_passes(gm, list(PASSES), report, PassContext("inference", "ge", "float16"))
        return make_boxed_func(gm)

    model, x = _model(), _x()
    with torch.no_grad():
        eager = model(x)
        out = torch.compile(model, backend=aot_autograd(fw_compiler=compiler), fullgraph=True)(x)
    (site,) = _sites(report)
    assert site.rewritten and site.precision == "float32 via float16", report.table()
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, eager, rtol=2e-3, atol=2e-3)


# ----------------------------------------------------------------------------
# Decoys: left alone, each listed once with what differs
# ----------------------------------------------------------------------------


DECOYS = {
    "indices from an input": (dict(indices_from_input=True), "are not top-k indices"),
    "a different causal rule": (dict(offset=1), "a different causal rule: the program masks index > s + 1"),
    "positions from an input": (dict(positions_from_input=True), "are data (they depend on a graph input)"),
    "finfo.min fill": (dict(fill=torch.finfo(torch.float32).min), "not -inf"),
    "no rope term": (dict(), None),  # replaced below: a model without the rope product
}


class NoRope(SparseMLA):
    """The latent product alone (no rope keys): not MLA-absorb, which is all the op computes."""

    def forward(self, x, idx=None, positions=None):
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, self.heads, D)
        kv = self.wkv(x)
        pos = torch.arange(s)
        scores = self.indexer(x).masked_fill(pos[None, :] > pos[:, None], float("-inf"))
        idx = scores.topk(self.top_k, dim=-1).indices
        kv_sel = self.gather(kv, idx)
        att = torch.einsum("bshc,bskc->bshk", q, kv_sel) * self.scale
        att = att.masked_fill((idx > pos[None, :, None])[:, :, None, :], float("-inf"))
        return torch.einsum("bshk,bskc->bshc", att.softmax(-1), kv_sel)


@pytest.mark.parametrize("name", sorted(DECOYS))
def test_decoys_are_left_alone_with_the_reason(name):
    kwargs, reason = DECOYS[name]
    x = _x()
    args = [x]
    if name == "no rope term":
        torch.manual_seed(0)
        model, reason = NoRope().eval(), "no rope score term"
    else:
        model = _model(**kwargs)
    if kwargs.get("indices_from_input") or kwargs.get("positions_from_input"):
        g = torch.Generator().manual_seed(3)
        idx = torch.stack([torch.randperm(8, generator=g)[:4] for _ in range(16)]).view(2, 8, 4)
        args += [idx, torch.arange(8)]
    with torch.no_grad():
        eager = model(*args)
    report = Report()
    out = _compiled(model, *args, report=report)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6, equal_nan=True)
    sites = _sites(report)
    assert len(sites) == 1, report.table()  # listed exactly once: by the rule, not again as unfused
    (site,) = sites
    assert not site.rewritten and reason in site.reason, report.table()
    assert site.pattern == PATTERN, report.table()
    assert "npu_sparse_flash_attention" not in _code(report)


# ----------------------------------------------------------------------------
# One complete GE graph
# ----------------------------------------------------------------------------


def test_dsa_layer_is_one_complete_ge_graph_with_sparse_flash_attention(tmp_path):
    from test_ge_converters import attr_value, only_op, producer

    model, x = _model(torch.float16), _x(torch.float16)
    with torch.no_grad():
        result = npu_attn_graph.to_ge_graph(model, x, out_dir=tmp_path)
    assert result.single_graph, result.summary()
    types = result.op_type_counts
    assert types["SparseFlashAttention"] == 1 and not [t for t in types if "." in t], result.summary()
    assert "SoftmaxV2" not in types and "BatchMatMulV2" not in types, types
    graph = result.graphs[0].graph_def
    op = only_op(graph, "SparseFlashAttention")
    assert attr_value(op, "sparse_mode") == 3 and attr_value(op, "attention_mode") == 2
    assert attr_value(op, "layout_query") == "BSND" and attr_value(op, "layout_kv") == "BSND"
    assert abs(attr_value(op, "scale_value") - (D + R) ** -0.5) < 1e-6
    key, _ = producer(graph, op, "key")
    value, _ = producer(graph, op, "value")
    assert key.name == value.name  # the latent cache serves as key and value
    indices, _ = producer(graph, op, "sparse_indices")
    assert indices.type != "Data"  # computed in the graph: topk -> sort -> cast
    assert "Sort" in types, types  # the rewrite's ascending sort of the top-k indices
