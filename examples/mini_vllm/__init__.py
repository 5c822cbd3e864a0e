"""mini-vLLM: a small serving engine whose model is plain PyTorch with paged KV caches,
compiled with ``torch.compile(..., backend="npu_attn")``.

    from examples.mini_vllm import LLMEngine, SamplingParams
    engine = LLMEngine.from_hf(hf_model, backend_options={"executor": "eager"})
    outputs = engine.generate([[1, 2, 3], [4, 5]], SamplingParams(max_tokens=8))

Run it: ``python -m examples.mini_vllm --prompts 16``.
"""

from .advance_step import advance_step
from .block_manager import BlockManager, OutOfBlocks
from .engine import LLMEngine, RequestOutput
from .model import ModelConfig, PagedCausalLM
from .sampler import SamplingParams, sample
from .scheduler import Request, Scheduler

__all__ = ["advance_step", "BlockManager", "OutOfBlocks", "LLMEngine", "RequestOutput", "ModelConfig",
           "PagedCausalLM", "SamplingParams", "sample", "Request", "Scheduler"]
