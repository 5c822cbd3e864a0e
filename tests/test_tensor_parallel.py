"""Tensor parallelism: a tiny Llama (4 heads, 2 KV heads) split over 2 gloo ranks on CPU.

The ranks are started the way users start them: torch.multiprocessing (spawn) with a
file:// rendezvous (no port to pick), once for the whole module (the processes' start
and imports are most of a rank's cost). Each rank runs examples/tensor_parallel.py's
run_rank: DTensor TP (transformers' plan, torch's parallelize_module) compiled with
backend="npu_attn" generating with a StaticCache; the mini-vLLM model split by hand
(column/row-parallel linears, functional all_reduce, paged caches per rank) served by
its engine; to_ge_graph of a decode step of each; ``npu-attn-graph explain`` and
``check`` of a shard with more heads than the fused ops take. Each rank writes its
results to rank<r>.json (or its traceback to error<r>.txt); the tests read them. Real
torch.distributed (gloo) and real TorchAir converters; only HCCL and the GE runtime
are absent (TorchAir offline names the gloo group itself).
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from examples import tensor_parallel as tp_example  # noqa: E402

transformers = pytest.importorskip("transformers")
pytest.importorskip("google.protobuf")
WORLD = 2
TIMEOUT_S = 600  # a safety net only: about 27 s of CPU per rank, minutes on a loaded 2-core machine
LAYERS = 2


def _worker(rank: int, world_size: int, init_method: str, out_dir: str) -> None:
    import torch.distributed as dist

    from npu_attn_graph.tensor_parallel import parallelize

    # The processes inherit nothing but sys.path: one thread each, on a 2-core machine.
    torch.set_num_threads(1)
    # Where TorchAir puts its per-input marks on AOT's inputs (torchair_bridge's fix): recorded, not changed.
    from npu_attn_graph.torchair_bridge import load_torchair

    compiler = sys.modules[f"{load_torchair().module.__name__}.npu_fx_compiler"]
    set_marks, marks = compiler._set_inputs_custom_attr, []

    def recording_set_marks(example_inputs, inputs_custom_attr):
        n = len(example_inputs)
        marks.append([[type(x).__name__, sorted(inputs_custom_attr.get(i - n, {})), list(getattr(x, "shape", []))]
                      for i, x in enumerate(example_inputs)])
        return set_marks(example_inputs, inputs_custom_attr)

    compiler._set_inputs_custom_attr = recording_set_marks
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=120))
    try:
        results = tp_example.run_rank(Path(out_dir), quiet=True)
        # A split that would cut a KV head in two is refused before anything is traced.
        config = transformers.LlamaConfig(vocab_size=128, hidden_size=96, intermediate_size=128, num_hidden_layers=1,
                                          num_attention_heads=6, num_key_value_heads=3, head_dim=16)
        mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (world_size,))
        try:
            parallelize(transformers.LlamaForCausalLM(config), mesh)
            results["uneven_error"] = None
        except ValueError as error:
            results["uneven_error"] = str(error)
        results["input_marks"] = marks
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(results))
    except BaseException:  # the parent reports it (a spawned process's exit code says nothing)
        (Path(out_dir) / f"error{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def run_ranks(tmp: Path, world: int = WORLD, timeout: float = TIMEOUT_S) -> list[dict]:
    """Start `world` ranks, wait at most `timeout` s; every process is gone when this returns."""
    init = f"file://{tmp / 'rendezvous'}"
    context = mp.start_processes(_worker, args=(world, init, str(tmp)), nprocs=world, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the {world} ranks did not finish within {timeout} s")
    except Exception as error:
        errors = [path.read_text() for path in sorted(tmp.glob("error*.txt"))]
        raise RuntimeError(f"a rank failed: {error}\n" + "\n".join(errors)) from error
    finally:
        for process in context.processes:  # on a failure or timeout: no process outlives the test
            if process.is_alive():
                process.kill()
            process.join(5)
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_ranks(tmp_path_factory.mktemp("tp"))


@pytest.mark.parametrize("part", ["dtensor", "paged"])
def test_tokens_equal_single_process_eager(ranks, part):
    for r in ranks:
        assert r[part]["tokens"] == r[part]["expected_tokens"], (r["rank"], part)


def test_dtensor_logits_equal_single_process_eager(ranks):
    # Every generate() step's logits at the sampled position, fp32: rtol = atol = 1e-5.
    for r in ranks:
        d = r["dtensor"]
        assert d["logits_close"], (r["rank"], d["logits_max_abs_diff"])


def test_dtensor_prefill_logits_at_every_position_equal_single_process_eager(ranks):
    # The compiled prefill call's whole output (2 prompts x 7 positions x 128 vocabulary), on every
    # rank, against the whole model run eagerly in one process; fp32: rtol = atol = 1e-5.
    assert (tp_example.LOGITS_RTOL, tp_example.LOGITS_ATOL) == (1e-5, 1e-5)
    for r in ranks:
        d = r["dtensor"]
        assert d["prefill_logits_shape"] == d["expected_prefill_logits_shape"] == \
            [2, tp_example.PROMPT_LEN, 128], d["prefill_logits_shape"]
        assert d["prefill_logits_close"], (r["rank"], d["prefill_logits_max_abs_diff"])


def test_each_rank_fuses_with_its_local_head_counts(ranks):
    for r in ranks:
        d = r["dtensor"]
        assert (d["local_heads"], d["local_kv_heads"]) == (2, 1)  # GQA: 4/2 heads split over 2 ranks
        attention = [s for s in d["sites"] if s["kind"] == "attention"]
        writes = [s for s in d["sites"] if s["kind"] == "kv_update"]
        # generate(): a prefill graph and a decode graph, 2 layers each; K and V written per layer.
        assert [s["fused_op"] for s in attention] == ["npu_prompt_flash_attention"] * LAYERS + \
            ["npu_incre_flash_attention"] * LAYERS, d["table"]
        assert all(s["gqa_ratio"] == 2 for s in attention), d["table"]
        assert len(writes) == 4 * LAYERS and all(s["fused_op"] == "scatter_update_" for s in writes), d["table"]
        # The decode graph is dynamo's one recompile (after the prefill's); the decode steps reuse it.
        assert d["graphs"] == 2 and d["graph_breaks"] == [] and len(d["recompiles"]) == 1, d["table"]
        p = r["paged"]
        assert p["local_kv_heads"] == 1
        fused = sorted(s["fused_op"] for s in p["sites"] if s["fused_op"])
        assert len(fused) == len(p["sites"]), p["table"]
        assert fused.count("npu_scatter_pa_kv_cache") == 4 * LAYERS and \
            fused.count("npu_incre_flash_attention_paged") == LAYERS and \
            fused.count("npu_prompt_flash_attention_packed") == LAYERS, p["table"]
        assert all(s["gqa_ratio"] == 2 for s in p["sites"] if s["kind"] == "attention"), p["table"]


def test_collectives_stay_functional_collectives(ranks):
    for r in ranks:
        # DTensor: o_proj and down_proj all_reduce per layer, lm_head's output all_gathered, per graph.
        assert r["dtensor"]["collectives"] == {"all_reduce": 2 * LAYERS * 2, "all_gather_into_tensor": 2,
                                               "wait_tensor": 2 * (2 * LAYERS + 1)}
        assert r["paged"]["collectives"] == {"all_reduce": 2 * LAYERS * 2, "wait_tensor": 2 * LAYERS * 2}


@pytest.mark.parametrize("part", ["dtensor", "paged"])
def test_one_complete_ge_graph_per_rank_with_hcom_ops(ranks, part):
    for r in ranks:
        ge = r[part]["ge"]
        assert ge["single_graph"] and not ge["failures"] and not ge["unconverted"], r[part]["ge_summary"]
        assert ge["sites_fused"] == ge["sites"] > 0, r[part]["ge_summary"]
        types = ge["op_types"]
        assert types.get("HcomAllReduce") == 2 * LAYERS and types.get("IncreFlashAttention") == LAYERS, types
        # TorchAir names a gloo group by its tag and ranks (on an NPU: the HCCL communicator's name).
        assert len(ge["groups"]) == 1 and ge["groups"][0].endswith("rank_list=0,1"), ge["groups"]
    types = ranks[0][part]["ge"]["op_types"]
    if part == "dtensor":
        assert types.get("HcomAllGather") == 1 and types.get("Scatter") == 2 * LAYERS, types
    else:
        assert types.get("ScatterPaKvCache") == LAYERS and types.get("AdvanceStep") == 1, types
    assert all(r[part]["ge"]["op_types"] == types for r in ranks)  # the ranks build the same graph


def test_torchair_marks_land_on_tensors_only(ranks):
    # AOT flattens each DTensor parameter into its local tensor and its DeviceMesh (a
    # FakeScriptObject while tracing); TorchAir's marks must follow (before the fix: a mark
    # on a FakeScriptObject, an AttributeError and no GE graph).
    for r in ranks:
        [dtensor_graph, paged_graph, _wide_graph] = r["input_marks"]  # the GE conversions, in run_rank's order
        meshes = [marks for kind, marks, _ in dtensor_graph if kind == "FakeScriptObject"]
        assert len(meshes) == 7 * LAYERS + 1 + 1 and not any(meshes)  # one per DTensor weight, lm_head, the mesh
        # The parameter mark: exactly the 21 parameters (embedding, 2 norms and 7 projections per layer, the
        # final norm, lm_head), with their local shapes; only the decode token has no mark at all (the caches,
        # their lengths and inv_freq are static inputs).
        parameters = [shape for _, marks, shape in dtensor_graph if "_torchair_is_parameter" in marks]
        assert len(parameters) == 1 + 9 * LAYERS + 1 + 1 and [32, 64] in parameters and [64, 32] in parameters, \
            parameters
        assert [(kind, shape) for kind, marks, shape in dtensor_graph if not marks and kind != "FakeScriptObject"] \
            == [("FakeTensor", [2, 1])]
        assert all(kind == "FakeTensor" for kind, _, _ in paged_graph)  # no subclass: TorchAir's own marks


def test_parallelize_refuses_a_split_without_whole_kv_heads(ranks):
    for r in ranks:
        assert r["uneven_error"] == ("tensor_parallel: config.num_key_value_heads = 3 must be divisible by the mesh "
                                     "size 2 (each rank holds whole heads)")


def test_a_rank_with_uneven_query_heads_per_kv_head_is_fused_exactly():
    """Rank 0 of an uneven split of 4 query heads over 2 KV heads (query heads 0-2, KV heads
    0-1: 3 local heads, not divisible by 2 local KV heads) maps each query head to its KV
    head by an index. No GQA ratio fits, so the site is fused as plain multi-head attention
    over the gathered K/V (ratio 1, the gather kept), and equals eager."""
    import torch.nn.functional as F

    from npu_attn_graph import NpuAttnBackend, Report

    def rank0_attention(q, k, v):
        kv_of_head = torch.tensor([0, 0, 1])
        return F.scaled_dot_product_attention(q, k.index_select(1, kv_of_head), v.index_select(1, kv_of_head),
                                              is_causal=True)

    torch.manual_seed(0)
    q, k, v = torch.randn(1, 3, 8, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    report = Report()
    out = torch.compile(rank0_attention, backend=NpuAttnBackend(executor="eager", report=report))(q, k, v)
    torch.testing.assert_close(out, rank0_attention(q, k, v), rtol=1e-5, atol=1e-5)
    [site] = report.sites
    assert (site.fused_op, site.gqa_ratio) == ("npu_prompt_flash_attention", 1), report.table()


def test_a_shard_without_whole_heads_is_a_clear_error():
    from examples.mini_vllm import PagedCausalLM
    from examples.mini_vllm.tensor_parallel import shard
    from npu_attn_graph.demo_models import build

    model = PagedCausalLM.from_hf(build("llama", "sdpa"))
    with pytest.raises(ValueError, match=r"num_kv_heads = 2 must be divisible by world_size = 4"):
        shard(model, 0, 4)
    with pytest.raises(ValueError, match=r"rank = 2 must be in \[0, 2\)"):
        shard(model, 2, 2)


def test_a_shard_the_ops_cannot_take_is_listed_with_the_reason_and_fails_check(ranks):
    """520 heads over 2 ranks: 260 local heads, more than the fused ops take (N <= 256). Each
    rank's ``npu-attn-graph explain`` lists the site with the reason and the value; its
    ``check`` fails naming the site (and the SDPA left for GE to convert)."""
    site = "model.layers.0.self_attn"
    reason = "npu_prompt_flash_attention: num_heads must be <= 256, got 260"
    for r in ranks:
        wide = r["wide"]
        assert (wide["local_heads"], wide["local_kv_heads"]) == (260, 130)
        explain, check = wide["explain"], wide["check"]
        assert explain["exit_code"] == 0, explain["stderr"]
        [row] = [line for line in explain["stdout"].splitlines() if line.startswith("inference  attention")]
        columns = row.split()  # graph, kind, layer, source, pattern, fused op, ...: no spaces before the reason
        assert columns[2] == site and columns[5] == "-" and reason in row, row  # left alone, with why
        assert "2/3 sites fused in 1 graph(s)" in explain["stdout"], explain["stdout"]  # the 2 cache writes are
        assert check["exit_code"] == 1, check
        lines = check["stdout"].splitlines()
        assert lines[0].startswith("FAIL ") and "2/3 sites fused" in lines[0], check["stdout"]
        assert any(line.startswith(f"  - attention site left alone at {site} ") and reason in line
                   for line in lines), check["stdout"]
        assert any("unconverted GE node" in line and "_scaled_dot_product_flash_attention_for_cpu" in line
                   for line in lines), check["stdout"]
