"""Tiny random-weight transformers models shared by the backend and GE tests."""

from __future__ import annotations

import torch
import transformers

LAYERS = 2
DECODERS = ["llama", "qwen2", "gpt2"]
IMPLEMENTATIONS = ["sdpa", "eager"]


def build(kind: str, attn: str):
    torch.manual_seed(0)
    if kind == "llama":
        cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                       max_position_embeddings=128)
        cls = transformers.LlamaForCausalLM
    elif kind == "qwen2":
        cfg = transformers.Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
        cls = transformers.Qwen2ForCausalLM
    elif kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=LAYERS, n_head=4, n_positions=128)
        cls = transformers.GPT2LMHeadModel
    else:
        cfg = transformers.BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                                      intermediate_size=128, max_position_embeddings=128)
        cls = transformers.BertModel
    cfg._attn_implementation = attn
    return cls(cfg).eval()


def scenario_call(kind: str, attn: str, scenario: str):
    """(model, args, kwargs) of one model call:
    - "prefill": a batch of 2 prompts, no cache (BERT: right padding in the mask);
    - "static_prefill": the prompts written into a fresh StaticCache;
    - "static_decode": one decode step after an eager static-cache prefill."""
    model = build(kind, attn)
    torch.manual_seed(1)
    ids = torch.randint(1, 128, (2, 7))
    if scenario == "prefill":
        mask = torch.ones_like(ids)
        if kind == "bert":
            mask[1, 5:] = 0
        return model, (ids,), {"attention_mask": mask}
    cache = transformers.StaticCache(config=model.config, max_cache_len=32)
    if scenario == "static_prefill":
        return model, (ids,), {"past_key_values": cache, "use_cache": True, "cache_position": torch.arange(7)}
    assert scenario == "static_decode", scenario
    with torch.no_grad():
        logits = model(ids, past_key_values=cache, use_cache=True, cache_position=torch.arange(7)).logits
    token = logits[:, -1:].argmax(-1)
    return model, (token,), {"past_key_values": cache, "use_cache": True, "cache_position": torch.tensor([7])}


SCENARIOS = [(kind, attn, scenario) for kind in DECODERS for attn in IMPLEMENTATIONS
             for scenario in ("prefill", "static_prefill", "static_decode")] + \
            [("bert", attn, "prefill") for attn in IMPLEMENTATIONS]
