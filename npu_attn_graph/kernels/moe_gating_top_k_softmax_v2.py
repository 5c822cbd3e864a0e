"""``npu_moe_gating_top_k_softmax_v2``: a MoE router's softmax and top-k in one op.

Schema: torch_npu 2.13.0's (namespace ``npu_attn``; the wheel's
torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml), written once, in the ``define``
call below; the drop-in function's docstring shows it.

Semantics (CANN aclnnMoeGatingTopKSoftmaxV2, ops-transformer moe_gating_top_k_softmax_v2):

- renorm 0: ``softmax_result = softmax(x, -1)``; ``y, expert_idx = topk(softmax_result, k)``
  (Qwen-MoE's router before its optional renormalisation);
- renorm 1: ``top, expert_idx = topk(x, k)``; ``y = softmax(top, -1)`` (gpt-oss's router;
  equal in exact arithmetic to renorm 0 followed by dividing by the sum of the k values);
- y has x's dtype (the softmax is computed in float32, as ATen's CPU softmax computes a
  half-precision softmax), expert_idx int32, both x.shape[:-1] + (k,); the values in
  descending order. Among equal values the reference picks as torch.topk does (so off
  the NPU a rewritten router chooses exactly the experts the original graph chose);
  CANN documents no order for ties. renorm 0 ranks the float32 probabilities (a
  half-precision x is not rounded to its dtype before the top-k);
- softmax_result (float32): x's shape with renorm 0 and output_softmax, else an empty
  (0,) tensor (the doc: "renorm=1 时该参数不生效"). torch_npu 2.13's meta function gives a
  3-D x a 2-D result there (it compares the method ``x.dim`` with 3); the fake here has
  the kernel's shape;
- finished (bool, x.shape[:-1]): rows marked True get expert index num_expert
  (x.shape[-1]) in every one of their k slots; y is computed as for the other rows
  (the doc defines only the index for such rows).

Rules (the doc): x 2-D or 3-D, float16 / bfloat16 / float32 (float64 off the NPU
only, for the reference); 0 < k <= x.shape[-1] and k <= 1024; renorm 0 or 1;
finished bool of shape x.shape[:-1]. The torch_npu doc marks the op inference-only:
it has no autograd formula here either.
"""

from __future__ import annotations

import torch

from ._dropin import dropin
from ._library import check, define, npu_rules_apply, register_fake, register_npu, register_reference

__all__ = ["npu_moe_gating_top_k_softmax_v2"]

OP = "npu_moe_gating_top_k_softmax_v2"
MAX_K = 1024
_NPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _validate(x: torch.Tensor, k: int, finished: torch.Tensor | None, renorm: int | None) -> None:
    check(x.dim() in (2, 3), OP, "x.dim()", "must be 2 or 3", x.dim())
    allowed = _NPU_DTYPES if npu_rules_apply(x) else _NPU_DTYPES + (torch.float64,)
    check(x.dtype in allowed, OP, "x.dtype", f"must be one of {list(allowed)}", x.dtype)
    check(0 < k <= x.shape[-1], OP, "k", f"must be in [1, x.shape[-1]] = [1, {x.shape[-1]}]", k)
    check(k <= MAX_K, OP, "k", f"must be at most {MAX_K}", k)
    check(renorm in (None, 0, 1), OP, "renorm", "must be 0 (softmax, then top-k) or 1 (top-k, then softmax)",
          renorm)
    if finished is not None:
        check(finished.dtype == torch.bool, OP, "finished.dtype", "must be torch.bool", finished.dtype)
        check(tuple(finished.shape) == tuple(x.shape[:-1]), OP, "finished.shape",
              f"must be x.shape[:-1] = {list(x.shape[:-1])}", list(finished.shape))


def _softmax_shape(x: torch.Tensor, renorm: int | None, output_softmax: bool | None) -> tuple:
    return tuple(x.shape) if not renorm and output_softmax else (0,)


NPU_MOE_GATING_TOP_K_SOFTMAX_V2 = define(
    OP, "(Tensor x, *, int k=1, Tensor? finished=None, int? renorm=0, bool? output_softmax=False) "
        "-> (Tensor, Tensor, Tensor)")


@register_fake(NPU_MOE_GATING_TOP_K_SOFTMAX_V2)
def _fake(x, *, k, finished, renorm, output_softmax):
    _validate(x, k, finished, renorm)
    out_shape = tuple(x.shape[:-1]) + (k,)
    return (x.new_empty(out_shape), x.new_empty(out_shape, dtype=torch.int32),
            x.new_empty(_softmax_shape(x, renorm, output_softmax), dtype=torch.float32))


def _ref(x, *, k, finished, renorm, output_softmax):
    _validate(x, k, finished, renorm)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    if renorm == 1:
        # The top k of x itself (casting first would keep the order, but ties are broken
        # on the values the caller ranks), then their softmax in float32.
        top, index = torch.topk(x, k, dim=-1, largest=True, sorted=True)
        y = torch.softmax(top.to(compute), dim=-1)
        probs = None
    else:
        probs = torch.softmax(x.to(compute), dim=-1)
        y, index = torch.topk(probs, k, dim=-1, largest=True, sorted=True)
    index = index.to(torch.int32)
    if finished is not None:
        index = torch.where(finished.unsqueeze(-1), torch.full_like(index, x.shape[-1]), index)
    if probs is not None and output_softmax:
        softmax_result = probs.to(torch.float32)
    else:
        softmax_result = x.new_empty(_softmax_shape(x, renorm, output_softmax), dtype=torch.float32)
    return y.to(x.dtype), index, softmax_result


register_reference(NPU_MOE_GATING_TOP_K_SOFTMAX_V2, _ref)
register_npu(NPU_MOE_GATING_TOP_K_SOFTMAX_V2)


npu_moe_gating_top_k_softmax_v2 = dropin(NPU_MOE_GATING_TOP_K_SOFTMAX_V2, __name__, """\
A router's expert choice: renorm 0 takes the top k of softmax(x) (and returns the
softmax, float32, when output_softmax); renorm 1 softmaxes the top k logits. Returns
(y: the k weights in x's dtype, expert_idx: int32, softmax_result).""")
