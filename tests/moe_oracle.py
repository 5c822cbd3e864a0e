"""Independent fp64 oracle for the npu_attn MoE ops, written from the torch_npu docs
(npu_grouped_matmul, npu_moe_compute_expert_tokens), NOT from the package code:
nothing here imports npu_attn_graph. Explicit loops, one rule per line.

* npu_moe_compute_expert_tokens(sorted, E): out[e] = #{i : sorted[i] <= e}, the end
  of expert e's rows (the doc's "last row each expert processes", by binary search).
* npu_grouped_matmul, x one (M, K) tensor and group_list (group_type 0): group g owns
  rows [start_g, end_g), end_g = group_list[g] (cumulative, type 0) or
  start_g + group_list[g] (counts, type 1); y[r, n] = sum_k x[r, k] * w_g[k, n]
  (+ bias_g[n]) for r in group g; rows past the last end are not computed (0 here).
* npu_grouped_matmul without group_list: y_g = x_g @ w_g (+ bias_g) per group.
* npu_moe_gating_top_k_softmax_v2 (aclnnMoeGatingTopKSoftmaxV2's formulas): renorm 0
  ranks softmax(row), renorm 1 softmaxes the k largest logits.
"""

from __future__ import annotations

import math

import torch

F64 = torch.float64


def expert_tokens(sorted_ids: list[int], num_expert: int) -> list[int]:
    return [sum(1 for v in sorted_ids if v <= e) for e in range(num_expert)]


def _row_times(x_row: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    k_dim, n_dim = w.shape
    out = torch.zeros(n_dim, dtype=F64)
    for n in range(n_dim):
        acc = 0.0
        for k in range(k_dim):
            acc += float(x_row[k]) * float(w[k, n])
        out[n] = acc + (float(bias[n]) if bias is not None else 0.0)
    return out


def grouped_rows(x: torch.Tensor, weights: list[torch.Tensor], group_list: list[int], group_list_type: int,
                 biases: list[torch.Tensor] | None = None) -> torch.Tensor:
    """One (M, K) x, per-group (K, N) weights; group_list as the op takes it."""
    rows, n_dim = x.shape[0], weights[0].shape[1]
    out = torch.zeros(rows, n_dim, dtype=F64)
    start = 0
    for g, value in enumerate(group_list):
        end = value if group_list_type == 0 else start + value
        for r in range(start, end):
            out[r] = _row_times(x[r], weights[g], biases[g] if biases else None)
        start = end
    return out


def per_group(xs: list[torch.Tensor], weights: list[torch.Tensor],
              biases: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    outs = []
    for g, (x, w) in enumerate(zip(xs, weights)):
        flat = x.reshape(-1, x.shape[-1])
        y = torch.stack([_row_times(flat[r], w, biases[g] if biases else None) for r in range(flat.shape[0])])
        outs.append(y.reshape(*x.shape[:-1], w.shape[1]))
    return outs


def gating_top_k_softmax(x: torch.Tensor, k: int, renorm: int) -> tuple[list[list[float]], list[list[int]]]:
    """npu_moe_gating_top_k_softmax_v2 per row of a 2-D x, in float64 with explicit loops:
    renorm 0 ranks softmax(row) and keeps the k largest (ties: the lower index first);
    renorm 1 keeps the k largest logits and softmaxes them."""
    weights, ids = [], []
    for row in x.tolist():
        if renorm == 0:
            peak = max(row)
            exps = [math.exp(v - peak) for v in row]
            total = sum(exps)
            ranked = [e / total for e in exps]
        else:
            ranked = list(row)
        order = sorted(range(len(ranked)), key=lambda j: (-ranked[j], j))[:k]
        ids.append(order)
        if renorm == 0:
            weights.append([ranked[j] for j in order])
        else:
            peak = max(row[j] for j in order)
            exps = [math.exp(row[j] - peak) for j in order]
            weights.append([e / sum(exps) for e in exps])
    return weights, ids
