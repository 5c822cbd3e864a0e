"""Encoder-decoder decode steps (issue 12, item 4): the cross-attention reads the
encoder K/V cached in the EncoderDecoderCache without a copy.

BART and T5 (tiny random configs of tests/models.py, sdpa and eager), one
static-cache decode step after the first (which wrote the cross caches): in
the rewritten graph every cross-attention's fused op takes the cache graph
inputs themselves as key and value (no gather, clone, repeat or cast), and
every self-attention reads its cache through the in-place writer that wrote
this step's token. The step equals eager (logits, rtol 1e-4 / atol 1e-5).
"""

from __future__ import annotations

import pytest
import torch

from npu_attn_graph import Report
from npu_attn_graph.passes.registry import ATTENTION_OPS

from models import build_matrix_model, static_decode_call

INPLACE_WRITE = torch.ops.npu_attn.scatter_update_.default


@pytest.mark.parametrize("family", ["bart", "t5"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_cross_attention_reads_the_cached_encoder_kv_without_a_copy(family, attn):
    model = build_matrix_model(family, attn)
    args, kwargs = static_decode_call(family, model)
    expected_model = build_matrix_model(family, attn)
    expected_args, expected_kwargs = static_decode_call(family, expected_model)
    report = Report()
    with torch.no_grad():
        expected = expected_model(*expected_args, **expected_kwargs).logits
        actual = torch.compile(model, backend="npu_attn", options={"report": report})(*args, **kwargs).logits
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)
    graph = report.graph_modules[-1].graph
    fused = [n for n in graph.nodes if n.op == "call_function" and n.target in ATTENTION_OPS]
    assert len(fused) == 4  # 2 layers x (self, cross)
    cross = [n for n in fused if all(n.args[i].op == "placeholder" for i in (1, 2))]
    self_attention = [n for n in fused if all(n.args[i].target is INPLACE_WRITE for i in (1, 2))]
    assert len(cross) == 2 and len(self_attention) == 2, [n.args[1:3] for n in fused]
    # the self-attention writes go straight into the cache inputs too
    assert all(n.args[i].args[0].op == "placeholder" for n in self_attention for i in (1, 2))
