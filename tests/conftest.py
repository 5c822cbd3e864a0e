"""Shared test setup."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch and leaves no compiled code behind."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(params=["default", "tiny-chunks", "fused-everywhere"])
def kernel_path(request, monkeypatch):
    """Run a reference-kernel test through each code path of the kernels: the
    default chunking; one query row (and one paged block) per chunk; and torch's
    fused SDPA for every dense chunk, decode-sized ones included (the kernels
    never take it with a sink). Test modules opt in with
    ``pytestmark = pytest.mark.usefixtures("kernel_path")``."""
    from npu_attn_graph.kernels import _attention_core, _library

    if request.param == "tiny-chunks":
        monkeypatch.setattr(_library, "SCORE_BLOCK_BYTES", 1)
    elif request.param == "fused-everywhere":
        monkeypatch.setattr(_attention_core, "FUSED_MIN_ROWS", 1)
    return request.param
