"""GE converters for npu_attn::npu_scatter_pa_kv_cache(_functional) -> GE ``ScatterPaKvCache``.

ScatterPaKvCache is a ref op on key_cache and value_cache (outputs of the same names).
"""

from __future__ import annotations

import torch

from ._ge import Tensor, TensorSpec, dont_prune_me, ge, register_fx_node_ge_converter

# GE attrs torch_npu's schema does not expose: the plain (not strided, not compressed) write.
SCATTER_MODE, STRIDES, OFFSETS = "None", [1, 1], [0, 0]


def _layout(cache_mode: str | None) -> str:
    """torch_npu: cache_mode None means the ND ("Norm") layout, as does "Norm"; the
    schema's default is "PA_NZ"."""
    return "Norm" if cache_mode is None else cache_mode


def _scatter_pa_kv_cache(key, value, key_cache, value_cache, slot_mapping, compress_lens, compress_seq_offsets,
                         seq_lens, cache_mode):
    return ge.ScatterPaKvCache(
        key, key_cache, slot_mapping, value, value_cache, compress_lens=compress_lens,
        compress_seq_offsets=compress_seq_offsets, seq_lens=seq_lens, cache_mode=cache_mode,
        scatter_mode=SCATTER_MODE, strides=STRIDES, offsets=OFFSETS)


@register_fx_node_ge_converter(torch.ops.npu_attn.npu_scatter_pa_kv_cache_functional.default)
def convert_scatter_pa_kv_cache_functional(
    key: Tensor, value: Tensor, key_cache: Tensor, value_cache: Tensor, slot_mapping: Tensor, *,
    compress_lens: Tensor | None = None, compress_seq_offsets: Tensor | None = None,
    seq_lens: Tensor | None = None, cache_mode: str = "PA_NZ", meta_outputs: TensorSpec | None = None,
) -> tuple[Tensor, Tensor]:
    """npu_attn::npu_scatter_pa_kv_cache_functional(Tensor key, Tensor value, Tensor key_cache,
    Tensor value_cache, Tensor slot_mapping, *, Tensor? compress_lens=None, Tensor? compress_seq_offsets=None,
    Tensor? seq_lens=None, str? cache_mode='PA_NZ') -> (Tensor, Tensor)

    GE op type: ScatterPaKvCache on TensorMove copies of both caches; with the
    graph's copy_ nodes back into the cache inputs TorchAir removes the copies and
    the op writes both caches in place. GE input order: key, key_cache,
    slot_mapping, value, value_cache (ScatterPaKvCache's IR).
    """
    return _scatter_pa_kv_cache(key, value, ge.TensorMove(key_cache), ge.TensorMove(value_cache), slot_mapping,
                                compress_lens, compress_seq_offsets, seq_lens, _layout(cache_mode))


@register_fx_node_ge_converter(torch.ops.npu_attn.npu_scatter_pa_kv_cache.default)
def convert_scatter_pa_kv_cache(
    key: Tensor, value: Tensor, key_cache: Tensor, value_cache: Tensor, slot_mapping: Tensor, *,
    compress_lens: Tensor | None = None, compress_seq_offsets: Tensor | None = None,
    seq_lens: Tensor | None = None, cache_mode: str = "PA_NZ", meta_outputs: TensorSpec | None = None,
) -> None:
    """npu_attn::npu_scatter_pa_kv_cache(Tensor key, Tensor value, Tensor(a!) key_cache, Tensor(b!) value_cache,
    Tensor slot_mapping, *, Tensor? compress_lens=None, Tensor? compress_seq_offsets=None,
    Tensor? seq_lens=None, str? cache_mode='PA_NZ') -> ()

    GE op type: ScatterPaKvCache directly on both caches, kept although nothing
    reads its outputs.
    """
    op = _scatter_pa_kv_cache(key, value, key_cache, value_cache, slot_mapping, compress_lens,
                              compress_seq_offsets, seq_lens, _layout(cache_mode))
    dont_prune_me(op[0] if isinstance(op, (list, tuple)) else op)
