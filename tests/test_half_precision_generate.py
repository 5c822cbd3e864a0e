"""float16 and bfloat16 models: StaticCache generate() compiled with npu_attn equals eager.

Tolerances (logits, absolute, every step up to the first token that differs):
float16 3e-2, bfloat16 1.5e-1. Why: the logits of these tiny random models
reach 5.3 to 6.7 in magnitude, where one float16 ulp is 2^-8 (3.9e-3) and one
bfloat16 ulp 2^-5 (3.1e-2). Eager attention rounds the scores, the
probabilities and the output to the model dtype at every step; the fused op
computes in float32 and rounds once. Measured worst differences over these
cases: float16 0.013, bfloat16 0.10, about 3 ulps; the tolerances are about 8
and 5 ulps.

Tokens: equal to eager, except where eager itself is a near-tie: greedy
decoding may pick the other token where eager's top two logits are closer than
the logit tolerance. Then the first differing step must be such a tie (eager's
margin below twice the tolerance), and everything before it equal.
"""

from __future__ import annotations

import pytest
import torch
import transformers as T

from npu_attn_graph import Report

LOGIT_ATOL = {torch.float16: 3e-2, torch.bfloat16: 1.5e-1}
NEW_TOKENS = 16

FAMILIES = {
    "llama": (T.LlamaConfig, T.LlamaForCausalLM, {}),
    "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM, {}),
    "mistral": (T.MistralConfig, T.MistralForCausalLM, {"sliding_window": 4}),
}
CASES = [("llama", "sdpa"), ("llama", "eager"), ("qwen2", "eager"), ("mistral", "sdpa")]


def _model(family: str, attn: str, dtype: torch.dtype):
    config_cls, model_cls, extra = FAMILIES[family]
    cfg = config_cls(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                     initializer_range=0.2, **extra)
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    return model_cls(cfg).eval().to(dtype), cfg


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("family,attn", CASES)
def test_static_cache_generate_equals_eager(family, attn, dtype):
    model, cfg = _model(family, attn, dtype)
    ids = torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(1))

    def generate():
        return model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
                              past_key_values=T.StaticCache(config=cfg, max_cache_len=32),
                              output_logits=True, return_dict_in_generate=True)

    report = Report()
    with torch.no_grad():
        eager = generate()
        model.forward = torch.compile(model.forward, backend="npu_attn", fullgraph=True, options={"report": report})
        fused = generate()
    assert report.sites and all(s.rewritten for s in report.sites), report.table()
    assert all(s.precision is None for s in report.sites), report.table()  # no casts around the fused ops

    atol = LOGIT_ATOL[dtype]
    new_eager, new_fused = eager.sequences[:, ids.shape[1]:], fused.sequences[:, ids.shape[1]:]
    differs = (new_eager != new_fused).any(dim=0)
    first = int(differs.nonzero()[0]) if differs.any() else NEW_TOKENS
    for step in range(first + 1 if first < NEW_TOKENS else NEW_TOKENS):
        torch.testing.assert_close(fused.logits[step].float(), eager.logits[step].float(), rtol=0, atol=atol,
                                   msg=lambda m, step=step: f"step {step}: {m}")
    if first < NEW_TOKENS:
        rows = (new_eager[:, first] != new_fused[:, first]).nonzero().flatten()
        top = eager.logits[first].float()[rows].topk(2, dim=-1).values
        margins = (top[:, 0] - top[:, 1]).tolist()
        assert all(m < 2 * atol for m in margins), (
            f"tokens differ at step {first} where eager's top-2 margins {margins} are not a near-tie "
            f"(< {2 * atol})")
