"""Checks shared by the npu_fusion_attention forward and grad converters."""

from __future__ import annotations

from ._ge import Tensor


def unsupported_fusion_arguments(op: str, softmax_layout: str, sink: Tensor | None) -> None:
    """Raise for the torch_npu arguments GE's FlashAttentionScore(Grad) in this TorchAir has no slot for."""
    if softmax_layout:
        raise NotImplementedError(f"{op}: softmax_layout={softmax_layout!r} has no GE FlashAttentionScore "
                                  "attribute in this TorchAir; only the default '' converts")
    if sink is not None:
        raise NotImplementedError(f"{op}: sink has no GE FlashAttentionScore input in this TorchAir")
