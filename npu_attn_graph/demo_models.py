"""Built-in demo targets: tiny transformers models with random weights.

``npu-attn-graph dump demo:llama`` and friends use them, and so do the tests.
Each factory returns ``(model, example_args, example_kwargs)``, like a user's
TARGET factory. They need transformers (``pip install 'npu_attn_graph[models]'``).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

LAYERS = 2
DECODERS = ["llama", "qwen2", "gpt2"]
IMPLEMENTATIONS = ["sdpa", "eager"]
SCENARIO_NAMES = ("prefill", "static_prefill", "static_decode")


def _transformers():
    try:
        import transformers
    except ImportError as error:
        raise RuntimeError("the built-in demo models need transformers: pip install 'npu_attn_graph[models]'") \
            from error
    return transformers


def build(kind: str, attn: str) -> torch.nn.Module:
    """A 2-layer model of the family `kind` with attention implementation `attn`, in eval mode."""
    transformers = _transformers()
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
    elif kind == "bert":
        cfg = transformers.BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                                      intermediate_size=128, max_position_embeddings=128)
        cls = transformers.BertModel
    else:
        raise ValueError(f"unknown demo model {kind!r}; choose one of {DECODERS + ['bert']}")
    cfg._attn_implementation = attn
    return cls(cfg).eval()


def scenario_call(kind: str, attn: str, scenario: str) -> tuple[torch.nn.Module, tuple, dict[str, Any]]:
    """(model, args, kwargs) of one model call:
    - "prefill": a batch of 2 prompts, no cache (BERT: right padding in the mask);
    - "static_prefill": the prompts written into a fresh StaticCache;
    - "static_decode": one decode step after an eager static-cache prefill."""
    if scenario not in SCENARIO_NAMES:
        raise ValueError(f"unknown scenario {scenario!r}; choose one of {list(SCENARIO_NAMES)}")
    transformers = _transformers()
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
    with torch.no_grad():
        logits = model(ids, past_key_values=cache, use_cache=True, cache_position=torch.arange(7)).logits
    token = logits[:, -1:].argmax(-1)
    return model, (token,), {"past_key_values": cache, "use_cache": True, "cache_position": torch.tensor([7])}


# demo:NAME targets: the Llama decode step is the richest (GQA attention + static KV writes).
DEMOS: dict[str, Callable[[], tuple]] = {
    "llama": lambda: scenario_call("llama", "sdpa", "static_decode"),
    "llama-prefill": lambda: scenario_call("llama", "sdpa", "prefill"),
    "qwen2": lambda: scenario_call("qwen2", "sdpa", "static_decode"),
    "gpt2": lambda: scenario_call("gpt2", "eager", "static_decode"),
    "bert": lambda: scenario_call("bert", "sdpa", "prefill"),
}
DEMO_HELP = {
    "llama": "tiny Llama (GQA, sdpa), one static-cache decode step",
    "llama-prefill": "tiny Llama (GQA, sdpa), prefill of 2 prompts",
    "qwen2": "tiny Qwen2 (GQA, sdpa), one static-cache decode step",
    "gpt2": "tiny GPT-2 (eager attention), one static-cache decode step",
    "bert": "tiny BERT encoder (sdpa), padded batch",
}
