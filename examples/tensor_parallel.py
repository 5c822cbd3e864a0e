"""A tiny Llama split over the ranks of a gloo group, compiled with backend="npu_attn".

    torchrun --nproc_per_node 2 -m examples.tensor_parallel

Every rank, with the same random weights and prompts:

1. DTensor tensor parallelism (``npu_attn_graph.tensor_parallel.parallelize``: transformers'
   plan, torch's ColwiseParallel / RowwiseParallel), model.forward compiled: greedy
   ``generate()`` with a StaticCache, its tokens, every step's logits and the prefill
   call's logits at every position compared with the whole model run eagerly in this
   process (what a single process computes);
2. the mini-vLLM model split by hand (``examples.mini_vllm.tensor_parallel``: column /
   row-parallel linears, a functional all_reduce, paged caches with the rank's KV
   heads) served by the engine, compared with transformers' ``generate()``;
3. ``to_ge_graph`` of one decode step of each: one GE graph per rank, with the fused
   attention ops and TorchAir's HcomAllReduce / HcomAllGather.
4. ``npu-attn-graph explain`` and ``check`` of a shard the fused ops cannot take
   (``wide_decode_step``: 520 heads, 260 per rank, over the ops' limit of 256): the
   report lists the site with the reason, and ``check`` fails naming it.

Each rank prints its report and its results; ``--out DIR`` also writes them as
``DIR/rank<r>.json`` (the tests read those). Off the NPU the GE graphs are built
offline (TorchAir from the torch-npu wheel), never run.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

PROMPT_LEN, NEW_TOKENS, CACHE_LEN = 7, 6, 32
LOGITS_RTOL = LOGITS_ATOL = 1e-5  # float32 throughout
SERVE_PROMPTS = [[5, 17, 3, 99, 42], [7, 1, 64, 23, 88, 12, 9, 31]]


def _collectives(report) -> dict[str, int]:
    """The _c10d_functional calls left in the rewritten graphs, by op."""
    counts: dict[str, int] = {}
    for gm in report.graph_modules:
        for node in gm.graph.nodes:
            if node.op == "call_function" and str(node.target).startswith("_c10d_functional."):
                name = str(node.target).split(".")[1]
                counts[name] = counts.get(name, 0) + 1
    return counts


def _sites(report) -> list[dict[str, Any]]:
    return [{"kind": s.kind, "layer": s.layer, "fused_op": s.fused_op, "gqa_ratio": s.gqa_ratio, "reason": s.reason,
             "graph": s.graph} for s in report.sites]


def _ge(result) -> dict[str, Any]:
    return {"single_graph": result.single_graph, "graph_count": result.graph_count,
            "op_types": dict(sorted(result.op_type_counts.items())),
            "groups": sorted({op.attr["group"].s.decode() for g in result.graphs for op in g.graph_def.op
                              if "group" in op.attr}),
            "failures": result.failures, "unconverted": [str(n) for n in result.unconverted],
            "sites_fused": len(result.report.fused()), "sites": len(result.report.sites)}


def dtensor_llama(rank: int, world_size: int, ge_dir: Path | None) -> dict[str, Any]:
    import transformers

    import npu_attn_graph
    from npu_attn_graph import NpuAttnBackend, Report
    from npu_attn_graph.backend import traced_afresh
    from npu_attn_graph.demo_models import build
    from npu_attn_graph.tensor_parallel import parallelize

    model = build("llama", "sdpa")  # seeded: the same weights on every rank
    torch.manual_seed(1)
    ids = torch.randint(1, 128, (2, PROMPT_LEN))
    # logits_to_keep=0: the prefill call computes the logits of every position (generate() asks for the
    # last one only otherwise), so the prefill graph's whole output is compared, not just what sampling reads.
    gen = dict(attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
               logits_to_keep=0)

    def static_cache():
        return transformers.StaticCache(config=model.config, max_cache_len=CACHE_LEN)

    def generate(forward):
        """Greedy generate() with a StaticCache through `forward`: the tokens, the logits of every step
        (the first is the prefill's, last position) and the prefill call's logits at every position."""
        calls = []

        @functools.wraps(forward)
        def recording(*args, **kwargs):
            out = forward(*args, **kwargs)
            calls.append(out.logits)
            return out

        model.forward = recording
        try:
            out = model.generate(ids, past_key_values=static_cache(), output_logits=True,
                                 return_dict_in_generate=True, **gen)
        finally:
            del model.forward  # back to the class's forward
        return out.sequences, torch.stack(out.logits), calls[0]

    eager_forward = model.forward
    with torch.no_grad():  # the whole model, eagerly: what one process computes
        expected_tokens, expected_logits, expected_prefill = generate(eager_forward)

    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (world_size,))
    parallelize(model, mesh)
    report = Report()
    with traced_afresh(report), torch.no_grad():
        tokens, logits, prefill = generate(torch.compile(model.forward, fullgraph=True,
                                                         backend=NpuAttnBackend(executor="eager", report=report)))
    attn = model.model.layers[0].self_attn
    out = {
        "local_heads": attn.q_proj.weight.to_local().shape[0] // attn.head_dim,
        "local_kv_heads": attn.k_proj.weight.to_local().shape[0] // attn.head_dim,
        # fp32 on both sides, the same ops but for the fused attention and the split matmuls' summation order.
        "logits_max_abs_diff": (logits - expected_logits).abs().max().item(),
        "logits_close": torch.allclose(logits, expected_logits, rtol=LOGITS_RTOL, atol=LOGITS_ATOL),
        "prefill_logits_shape": list(prefill.shape), "expected_prefill_logits_shape": list(expected_prefill.shape),
        "prefill_logits_max_abs_diff": (prefill - expected_prefill).abs().max().item(),
        "prefill_logits_close": torch.allclose(prefill, expected_prefill, rtol=LOGITS_RTOL, atol=LOGITS_ATOL),
        "tokens": tokens.tolist(), "expected_tokens": expected_tokens.tolist(),
        "sites": _sites(report), "graphs": report.graphs, "graph_breaks": report.graph_breaks,
        "recompiles": report.recompiles, "collectives": _collectives(report), "table": report.table(),
    }
    # One decode step after an eager prefill, as a GE graph.
    step_args, step_kwargs = _decode_step_call(model, ids)
    with torch.no_grad():
        result = npu_attn_graph.to_ge_graph(model, *step_args, out_dir=ge_dir, **step_kwargs)
    out["ge"] = _ge(result)
    out["ge_summary"] = result.summary()
    return out


def _decode_step_call(model, ids: torch.Tensor) -> tuple[tuple, dict[str, Any]]:
    """The arguments of one StaticCache decode step, after an eager prefill of `ids`."""
    import transformers

    cache = transformers.StaticCache(config=model.config, max_cache_len=CACHE_LEN)
    with torch.no_grad():
        step = model(ids, past_key_values=cache, use_cache=True, cache_position=torch.arange(ids.shape[1]))
    token = step.logits[:, -1:].argmax(-1)
    return (token,), {"past_key_values": cache, "use_cache": True, "cache_position": torch.tensor([ids.shape[1]])}


def dtensor_decode_step():
    """A TARGET for ``npu-attn-graph check|explain|dump`` on each rank, under torchrun:

        torchrun --nproc_per_node 2 -m npu_attn_graph check examples/tensor_parallel.py:dtensor_decode_step

    This rank's DTensor-parallel tiny Llama and one StaticCache decode step (joins the
    gloo group torchrun describes, if the process has none yet)."""
    from npu_attn_graph.demo_models import build
    from npu_attn_graph.tensor_parallel import parallelize

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    model = build("llama", "sdpa")
    parallelize(model, torch.distributed.device_mesh.init_device_mesh("cpu", (dist.get_world_size(),)))
    torch.manual_seed(1)
    args, kwargs = _decode_step_call(model, torch.randint(1, 128, (2, PROMPT_LEN)))
    return model, args, kwargs


# More heads per rank than the fused attention ops take (N <= 256): 520 heads and 260 KV heads leave
# 260 and 130 per rank of 2 (one process could not fuse them either; four ranks, 130 each, would).
WIDE_HEADS, WIDE_KV_HEADS = 520, 260


def wide_decode_step():
    """A TARGET whose shard cannot be fused, for ``check`` / ``explain`` on each rank:

        torchrun --nproc_per_node 2 -m npu_attn_graph check examples/tensor_parallel.py:wide_decode_step

    A 1-layer Llama with WIDE_HEADS heads, DTensor-parallel over the group: each rank's
    attention has WIDE_HEADS / world_size local heads; one StaticCache decode step."""
    import transformers

    from npu_attn_graph.tensor_parallel import parallelize

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    torch.manual_seed(0)  # the same weights on every rank
    # hidden_size: transformers wants a multiple of the head count; head_dim 16 keeps the projections small.
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=WIDE_HEADS, intermediate_size=128,
                                      num_hidden_layers=1, num_attention_heads=WIDE_HEADS,
                                      num_key_value_heads=WIDE_KV_HEADS, head_dim=16, max_position_embeddings=128)
    config._attn_implementation = "sdpa"
    model = transformers.LlamaForCausalLM(config).eval()
    parallelize(model, torch.distributed.device_mesh.init_device_mesh("cpu", (dist.get_world_size(),)))
    torch.manual_seed(1)
    args, kwargs = _decode_step_call(model, torch.randint(1, 128, (2, PROMPT_LEN)))
    return model, args, kwargs


def wide_heads_cli(rank: int, world_size: int) -> dict[str, Any]:
    """``npu-attn-graph explain`` and ``check`` of :func:`wide_decode_step` on this rank, as a
    user runs them under torchrun: exit codes and what they print."""
    import contextlib
    import io

    from npu_attn_graph.cli import main as cli

    # (under ``torchrun -m examples.tensor_parallel`` this module is __main__: name it as users would)
    target = f"{'examples.tensor_parallel' if __name__ == '__main__' else __name__}:wide_decode_step"
    out: dict[str, Any] = {"local_heads": WIDE_HEADS // world_size, "local_kv_heads": WIDE_KV_HEADS // world_size}
    for command in ("explain", "check"):
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = cli([command, target])
        out[command] = {"exit_code": code, "stdout": stdout.getvalue(), "stderr": stderr.getvalue()[-2000:]}
    return out


def paged_engine(rank: int, world_size: int, ge_dir: Path | None) -> dict[str, Any]:
    import npu_attn_graph
    from npu_attn_graph import Report
    from npu_attn_graph.demo_models import build

    from .mini_vllm import LLMEngine, PagedCausalLM, SamplingParams
    from .mini_vllm.tensor_parallel import shard

    hf = build("llama", "sdpa")
    with torch.no_grad():
        expected = [hf.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
                    [0, len(p):].tolist() for p in SERVE_PROMPTS]
    model = shard(PagedCausalLM.from_hf(hf), rank, world_size)
    report = Report()
    # Fixed shapes: one prefill size (16 tokens) and one decode size (2 live rows + padding).
    engine = LLMEngine(model, num_blocks=5, block_size=16, max_model_len=32, max_num_seqs=2,
                       max_num_batched_tokens=16, decode_batch_sizes=(3,),
                       backend_options={"executor": "eager", "report": report})
    outputs = engine.generate(SERVE_PROMPTS, SamplingParams(max_tokens=NEW_TOKENS))
    out = {
        "local_kv_heads": engine.kv_caches[0].shape[2], "tokens": [o.output_token_ids for o in outputs],
        "expected_tokens": expected, "sites": _sites(report), "graphs": report.graphs,
        "collectives": _collectives(report), "table": report.table(),
    }
    b = 3
    st = engine._states[b]
    st.block_tables.copy_(torch.tensor([[0, 1], [2, 4], [4, 4]]))
    st.seq_lens.copy_(torch.tensor([17, 3, 1]))
    st.sampled.copy_(torch.tensor([[5], [7]]))
    with torch.no_grad():
        result = npu_attn_graph.to_ge_graph(model.advance_and_decode, st.input_tokens, st.sampled, st.positions,
                                            st.seq_lens, st.slot_mapping, st.block_tables, b, b - 1,
                                            engine.block_size, engine.kv_caches, out_dir=ge_dir)
    out["ge"] = _ge(result)
    out["ge_summary"] = result.summary()
    return out


def run_rank(out_dir: Path | None = None, quiet: bool = False) -> dict[str, Any]:
    """Everything above on this rank of the initialised default group; returns the results."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    ge_root = out_dir / f"ge{rank}" if out_dir is not None else None
    results: dict[str, Any] = {"rank": rank, "world_size": world_size, "cpu_seconds": {}}
    for part, run in (("dtensor", dtensor_llama), ("paged", paged_engine),
                      ("wide", lambda rank, world_size, _: wide_heads_cli(rank, world_size))):
        start = time.process_time()  # this process's CPU time: comparable on a loaded machine
        results[part] = run(rank, world_size, ge_root / part if ge_root else None)
        results["cpu_seconds"][part] = round(time.process_time() - start, 1)
    if out_dir is not None:
        (out_dir / f"rank{rank}.json").write_text(json.dumps(results, indent=1))
    if not quiet:
        for part in ("dtensor", "paged"):
            r = results[part]
            print(f"[rank {rank}] {part}: tokens {'equal' if r['tokens'] == r['expected_tokens'] else 'DIFFER'}; "
                  f"collectives in the graphs {r['collectives']}\n{r['table']}\n{r['ge_summary']}", flush=True)
        wide = results["wide"]
        print(f"[rank {rank}] {wide['local_heads']} local heads: npu-attn-graph check exits "
              f"{wide['check']['exit_code']}\n{wide['check']['stdout']}", flush=True)
    return results


def spawned(rank: int, world_size: int, init_method: str, out_dir: str) -> None:
    """A torch.multiprocessing entry point: a file:// or tcp:// rendezvous."""
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=120))
    try:
        run_rank(Path(out_dir), quiet=True)
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write rank<r>.json and each rank's GE dumps here")
    args = parser.parse_args(argv)
    if "RANK" not in os.environ:
        print("run with torchrun: torchrun --nproc_per_node 2 -m examples.tensor_parallel", file=sys.stderr)
        return 2
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    try:
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
        run_rank(args.out)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
