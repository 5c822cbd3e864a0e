"""The model definition: Llama / Qwen2 in plain PyTorch with paged KV caches.

Nothing here calls an npu_attn op. The attention and KV-cache code is written the way
vLLM-style serving code writes it, so that ``torch.compile(..., backend="npu_attn")``
can find it:

* caches: per layer a key and a value cache shaped (num_blocks, block_size, Hkv, D),
  passed to every step as inputs;
* the paged write: ``k_cache.view(-1, Hkv, D)[slot_mapping] = k`` (value likewise);
* the paged read (decode): ``k_cache[block_tables]`` then
  ``.view(B, max_blocks * block_size, Hkv, D)`` and a transpose to BNSD, masked with
  ``torch.arange(S_kv) < seq_lens[:, None]``;
* varlen prefill: the sequences of a batch packed into one token axis (TND-style), the
  mask per-sequence causal from each token's sequence id and position, attending over
  the fresh keys/values (the cache is only written);
* the decode step state (tokens, positions, seq_lens, slot_mapping) prepared by
  :func:`advance_step` (vLLM's Python form of ``advance_step_flashattn``), which the
  engine runs (compiled on its own) before each decode forward.

RoPE, RMSNorm, GQA and the SwiGLU MLP follow transformers' Llama / Qwen2 (Qwen2 has
q/k/v biases), in the same order of operations, so that float32 results match
transformers' to rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .advance_step import advance_step


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    attention_bias: bool  # Qwen2: q/k/v projections have biases
    tie_word_embeddings: bool
    eos_token_id: int | None = None

    @classmethod
    def from_hf(cls, config) -> "ModelConfig":
        model_type = getattr(config, "model_type", "llama")
        if model_type not in ("llama", "qwen2"):
            raise ValueError(f"mini_vllm supports Llama and Qwen2 models, not model_type={model_type!r}")
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        bias = True if model_type == "qwen2" else bool(getattr(config, "attention_bias", False))
        if getattr(config, "mlp_bias", False):
            raise ValueError("mini_vllm: MLP biases (mlp_bias=True) are not supported")
        eos = config.eos_token_id
        if isinstance(eos, (list, tuple)):
            eos = eos[0] if eos else None
        return cls(config.vocab_size, config.hidden_size, config.intermediate_size, config.num_hidden_layers, heads,
                   getattr(config, "num_key_value_heads", None) or heads, head_dim, config.rms_norm_eps, bias,
                   bool(getattr(config, "tie_word_embeddings", False)), eos)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, Hkv, S, D) -> (B, Hkv * groups, S, D), as transformers writes it."""
    if groups == 1:
        return x
    b, hkv, s, d = x.shape
    return x[:, :, None, :, :].expand(b, hkv, groups, s, d).reshape(b, hkv * groups, s, d)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)

    def _qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x (T, hidden) -> q (T, H, D), k and v (T, Hkv, D), RoPE applied to q and k."""
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.heads, self.head_dim)
        k = self.k_proj(x).view(t, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(t, self.kv_heads, self.head_dim)
        cos, sin = cos[:, None, :], sin[:, None, :]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        return q, k, v

    def prefill(self, x, cos, sin, mask, slot_mapping, k_cache, v_cache):
        """Packed varlen prefill: x (T, hidden), mask (T, T) True = attend."""
        t = x.shape[0]
        q, k, v = self._qkv(x, cos, sin)
        # The paged write (vLLM's reshape_and_cache in plain PyTorch).
        k_cache.view(-1, self.kv_heads, self.head_dim)[slot_mapping] = k
        v_cache.view(-1, self.kv_heads, self.head_dim)[slot_mapping] = v
        groups = self.heads // self.kv_heads
        q = q.transpose(0, 1).unsqueeze(0)  # (1, H, T, D)
        k = repeat_kv(k.transpose(0, 1).unsqueeze(0), groups)
        v = repeat_kv(v.transpose(0, 1).unsqueeze(0), groups)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None, None])
        return self.o_proj(out.squeeze(0).transpose(0, 1).reshape(t, self.heads * self.head_dim))

    def decode(self, x, cos, sin, seq_lens, slot_mapping, block_tables, k_cache, v_cache):
        """Batched paged decode: x (B, hidden), one new token per row."""
        b = x.shape[0]
        q, k, v = self._qkv(x, cos, sin)
        k_cache.view(-1, self.kv_heads, self.head_dim)[slot_mapping] = k
        v_cache.view(-1, self.kv_heads, self.head_dim)[slot_mapping] = v
        # The paged read: every row's blocks gathered through its block table.
        s_kv = block_tables.shape[1] * k_cache.shape[1]
        keys = k_cache[block_tables].view(b, s_kv, self.kv_heads, self.head_dim).transpose(1, 2)
        values = v_cache[block_tables].view(b, s_kv, self.kv_heads, self.head_dim).transpose(1, 2)
        mask = torch.arange(s_kv, device=x.device) < seq_lens[:, None]  # (B, S_kv), True = attend
        groups = self.heads // self.kv_heads
        keys, values = repeat_kv(keys, groups), repeat_kv(values, groups)
        out = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=mask[:, None, None, :])
        return self.o_proj(out.reshape(b, self.heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def _mlp(self, h):
        return h + self.mlp(self.post_attention_layernorm(h))


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class PagedCausalLM(nn.Module):
    """Llama / Qwen2 with paged KV caches. Parameter names are transformers' own, so a
    transformers state dict loads as is (``from_hf``)."""

    def __init__(self, cfg: ModelConfig, inv_freq: torch.Tensor, attention_scaling: float = 1.0):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", inv_freq.detach().clone().float(), persistent=False)
        self.attention_scaling = float(attention_scaling)

    @classmethod
    def from_hf(cls, hf_model) -> "PagedCausalLM":
        """A transformers LlamaForCausalLM / Qwen2ForCausalLM -> this definition (weights copied)."""
        cfg = ModelConfig.from_hf(hf_model.config)
        rotary = hf_model.model.rotary_emb
        model = cls(cfg, rotary.inv_freq, getattr(rotary, "attention_scaling", 1.0))
        missing, unexpected = model.load_state_dict(hf_model.state_dict(), strict=False)
        missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]
        unexpected = [u for u in unexpected if not u.endswith("rotary_emb.inv_freq")]
        if missing or unexpected:
            raise ValueError(f"mini_vllm: weights do not match the model definition: missing {missing}, "
                             f"unexpected {unexpected}")
        dtype = next(hf_model.parameters()).dtype
        return model.to(dtype).eval()

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype | None = None) -> "PagedCausalLM":
        """A local checkpoint folder (transformers format) -> this definition."""
        import transformers

        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype) if dtype else \
            transformers.AutoModelForCausalLM.from_pretrained(path)
        return cls.from_hf(hf)

    def _rope(self, positions: torch.Tensor, dtype: torch.dtype):
        freqs = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)

    def prefill(self, input_ids: torch.Tensor, positions: torch.Tensor, seq_ids: torch.Tensor,
                slot_mapping: torch.Tensor, kv_caches: list[torch.Tensor]) -> torch.Tensor:
        """Packed varlen prefill of several sequences.

        input_ids, positions, seq_ids, slot_mapping: (T,) for the T tokens of the batch,
        sequences one after another (padding tokens: seq_id -1, slot -1). The mask lets a
        token see the tokens of its own sequence at positions up to its own. Returns the
        final hidden states (T, hidden); the engine takes each sequence's last row.
        """
        h = self.model.embed_tokens(input_ids)
        cos, sin = self._rope(positions, h.dtype)
        mask = (seq_ids[:, None] == seq_ids[None, :]) & (positions[None, :] <= positions[:, None])
        for i, layer in enumerate(self.model.layers):
            h = h + layer.self_attn.prefill(layer.input_layernorm(h), cos, sin, mask, slot_mapping,
                                            kv_caches[2 * i], kv_caches[2 * i + 1])
            h = layer._mlp(h)
        return self.model.norm(h)

    def decode(self, input_tokens: torch.Tensor, positions: torch.Tensor, seq_lens: torch.Tensor,
               slot_mapping: torch.Tensor, block_tables: torch.Tensor, kv_caches: list[torch.Tensor]) -> torch.Tensor:
        """One decode step of a padded batch: one new token per row.

        input_tokens, positions, slot_mapping, seq_lens: (B,), as advance_step left them
        (seq_lens counts the new token); block_tables (B, max_blocks). Writes the new
        keys/values, attends over each row's seq_lens keys, returns the logits (B, vocab).
        """
        h = self.model.embed_tokens(input_tokens)
        cos, sin = self._rope(positions, h.dtype)
        for i, layer in enumerate(self.model.layers):
            h = h + layer.self_attn.decode(layer.input_layernorm(h), cos, sin, seq_lens, slot_mapping, block_tables,
                                           kv_caches[2 * i], kv_caches[2 * i + 1])
            h = layer._mlp(h)
        return self.lm_head(self.model.norm(h))

    def advance_and_decode(self, input_tokens: torch.Tensor, sampled_token_ids: torch.Tensor,
                           positions: torch.Tensor, seq_lens: torch.Tensor, slot_mapping: torch.Tensor,
                           block_tables: torch.Tensor, num_seqs: int, num_queries: int, block_size: int,
                           kv_caches: list[torch.Tensor]) -> torch.Tensor:
        """A whole decode step, as one graph: advance_step (the sampled tokens become the inputs;
        positions, seq_lens and slots move one token on, in place), then ``decode``."""
        advance_step(input_tokens, sampled_token_ids, positions, seq_lens, slot_mapping, block_tables, num_seqs,
                     num_queries, block_size)
        return self.decode(input_tokens, positions, seq_lens, slot_mapping, block_tables, kv_caches)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
