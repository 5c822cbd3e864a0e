"""Bytes one call of a rewritten graph moves through memory, op by op, against the ideal.

A decode step is memory bound: on the NPU its time follows the bytes it moves.
`fx_traffic` estimates them for an FX graph (the one our passes hand to TorchAir
or an executor) from each node's fake value, `ge_traffic` for a GE graph from
its tensor descriptions. The model of an op's cost:

- views are free (view, reshape of a contiguous tensor, transpose, expand,
  slice, ...): they move no data; a tensor read through an expand counts its
  distinct elements only;
- a gather (embedding, index_select, index) reads the rows it returns, not the
  whole table;
- a fused attention op reads its query, the valid part of K and V (the part
  its KV lengths name: ``actual_seq_lengths`` given as ints, or the caller's
  ``valid_kv`` where the lengths are a tensor; the whole K/V when it has none),
  every other tensor argument whole, and writes its outputs;
- a KV writer in place (``scatter_update_``, or the functional writer whose
  result the graph copies back into the same cache: TorchAir turns that pair
  into one in-place GE write) reads and writes the new rows only;
- every other op reads its tensor arguments and writes its results.

The ideal step reads every weight once (an embedding table: the rows looked
up), reads the valid K/V once and writes the new K/V once. An op that moves a
whole KV cache per step besides the attention ops' own reads (a cast of the
cache, a roll, a materialised repeat_kv, a full-cache ``copy_``, a functional
write) is flagged with its bytes and the remedy.
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from .passes._fx import dynamo_val

aten = torch.ops.aten

# Results that alias their input without moving data, besides what is_view finds by schema.
_FREE = {operator.getitem, aten.alias.default, aten.detach.default, aten._unsafe_view.default}
_GATHERS = {aten.embedding.default, aten.index_select.default, aten.index.Tensor, aten.gather.default}
_IN_PLACE_WRITERS = {aten.index_copy_.default, aten.index_put_.default}
_FUNCTIONAL_WRITERS = {aten.index_copy.default, aten.index_put.default, aten.slice_scatter.default,
                       aten.select_scatter.default}
_CASTS = {aten._to_copy.default, torch.ops.prims.convert_element_type.default}
_MATERIALISE = {aten.clone.default, aten.repeat_interleave.self_int, aten.repeat_interleave.Tensor,
                aten.repeat.default, aten.cat.default, aten.contiguous.default}

REMEDY = {
    "cast": "deploy the model in float16/bfloat16 (e.g. model.half()): the fused op then reads the in-place "
            "written cache directly (a float32 model bound for GE casts its whole cache each step)",
    "repeat_kv": "the materialised repeat_kv stays: see the attention site's notes (gqa_repeat_kv)",
    "roll": "a full sliding-window step shifts the whole cache by one slot (sliding_window_cache_update: "
            "an open point, see its docstring)",
    "copy": "the KV write was not fused in place: see the kv_update sites",
    "other": "an op reads or writes a whole KV cache each step: see the FX graph after the passes",
}


@dataclass
class OpBytes:
    """What one op moves in one call."""

    name: str  # FX node / GE op name
    op: str  # target / GE op type
    read: int
    written: int
    note: str = ""
    whole_cache: str | None = None  # a REMEDY key when the op moves a whole KV cache besides attention's reads

    @property
    def total(self) -> int:
        return self.read + self.written


@dataclass
class Ideal:
    weights: int = 0  # every weight read once (embedding tables: the rows looked up)
    kv_read: int = 0  # the valid K/V read once
    kv_written: int = 0  # the new K/V written once

    @property
    def total(self) -> int:
        return self.weights + self.kv_read + self.kv_written


@dataclass
class Traffic:
    """The bytes of one call of one graph, op by op."""

    graph: str  # "fx" or "ge"
    ops: list[OpBytes]
    ideal: Ideal
    valid_kv: int | None = None  # valid K/V positions per sequence the estimate assumed (None: the ops' own)
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(o.total for o in self.ops)

    @property
    def ratio(self) -> float:
        return self.total / self.ideal.total if self.ideal.total else math.inf

    def top(self, n: int = 3) -> list[OpBytes]:
        return sorted(self.ops, key=lambda o: -o.total)[:n]

    def whole_cache(self) -> list[OpBytes]:
        return [o for o in self.ops if o.whole_cache]

    def lines(self, top: int = 3) -> list[str]:
        assumed = "every cache slot valid" if self.valid_kv is None else f"{self.valid_kv} valid K/V positions"
        out = [f"{self.graph} graph: {mib(self.total)} per call, ideal {mib(self.ideal.total)} (weights "
               f"{mib(self.ideal.weights)}, K/V read {mib(self.ideal.kv_read)}, written {mib(self.ideal.kv_written)};"
               f" {assumed}): {self.ratio:.3f}x ideal"]
        out += [f"  top: {o.name} ({o.op}) {mib(o.total)}{f' [{o.note}]' if o.note else ''}" for o in self.top(top)]
        flagged = self.whole_cache()
        if flagged:
            total = sum(o.total for o in flagged)
            out.append(f"  {len(flagged)} op(s) move a whole KV cache each step, {mib(total)} in all:")
            out += [f"    {o.name} ({o.op}) {mib(o.total)}: {o.note}; remedy: {REMEDY[o.whole_cache]}"
                    for o in flagged]
        out += [f"  note: {n}" for n in self.notes]
        return out


def mib(n: float) -> str:
    return f"{n / 2 ** 20:.2f} MiB"


# ---------------------------------------------------------------------------- FX


def tensor_bytes(t: Any) -> int:
    """Bytes of the distinct elements of a (fake) tensor: a broadcast (stride 0) dim counts once."""
    if not isinstance(t, torch.Tensor):
        return 0
    count = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            count *= int(size)
    return count * t.element_size()


def _tensor_args(node: torch.fx.Node) -> list[torch.fx.Node]:
    found: list[torch.fx.Node] = []
    torch.fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) if isinstance(dynamo_val(n), torch.Tensor)
                          else None)
    return found


def _out_bytes(node: torch.fx.Node) -> int:
    value = dynamo_val(node)
    if isinstance(value, (tuple, list)):
        return sum(tensor_bytes(v) for v in value)
    return tensor_bytes(value)


def _is_free(node: torch.fx.Node) -> bool:
    from .passes._fx import is_view

    return node.op != "call_function" or node.target in _FREE or is_view(node)


def _root(node: Any) -> Any:
    """The tensor a value reads through views, in-place writes, casts and materialised copies (a K/V
    argument -> its cache)."""
    from .passes.registry import WRITER_OPS

    seen = 0
    while isinstance(node, torch.fx.Node) and node.op == "call_function" and seen < 64:
        seen += 1
        if node.target in WRITER_OPS:
            writer = WRITER_OPS[node.target]
            if node.target is writer.functional and writer.functional_returns_tuple:
                return node
            node = node.args[writer.cache_args[0]]
        elif (_is_free(node) or node.target in _CASTS or node.target in _MATERIALISE
              or node.target in _IN_PLACE_WRITERS or node.target in _FUNCTIONAL_WRITERS):
            args = _tensor_args(node)
            if not args:
                return node
            node = args[0]
        else:
            return node
    return node


def _kv_fraction(node: torch.fx.Node, valid_kv: int | None) -> tuple[float, str]:
    """The share of K/V a fused attention op reads, and how it is known."""
    from .passes.registry import ATTENTION_OPS

    spec = ATTENTION_OPS[node.target]
    key = dynamo_val(node.args[spec.key_arg])
    layout = node.kwargs.get("input_layout", "BSH")
    # The incremental ops' actual_seq_lengths are the KV lengths; the others name them actual_seq_lengths_kv.
    lengths = node.kwargs.get("actual_seq_lengths" if spec.query_len == "one" else "actual_seq_lengths_kv")
    if node.kwargs.get("block_table") is not None:  # (the lengths wrappers take none for dense K/V)
        return (1.0, "paged: reads the blocks its table names") if valid_kv is None else \
            (1.0, "paged: valid length unknown to the count")
    if not isinstance(key, torch.Tensor) or key.dim() < 3:
        return 1.0, ""
    s_kv = int(key.shape[2] if layout.startswith("BNSD") else key.shape[1])
    if isinstance(lengths, (list, tuple)) and lengths and all(isinstance(v, int) for v in lengths):
        batch = int(key.shape[0])
        kept = sum(min(max(v, 0), s_kv) for v in (list(lengths) * batch)[:batch])
        return kept / (batch * s_kv), f"reads {kept // batch}/{s_kv} K/V positions (actual_seq_lengths)"
    if isinstance(lengths, torch.fx.Node) and valid_kv is not None:
        return min(valid_kv, s_kv) / s_kv, f"reads {min(valid_kv, s_kv)}/{s_kv} K/V positions (lengths tensor)"
    if isinstance(lengths, torch.fx.Node):
        return 1.0, f"reads its lengths tensor's K/V positions (every one of the {s_kv} counted valid)"
    return 1.0, f"reads all {s_kv} K/V positions (no KV lengths)"


def fx_traffic(graph: torch.fx.Graph | torch.fx.GraphModule, valid_kv: int | None = None) -> Traffic:
    """The bytes of one call of an FX graph (nodes need fake values in meta['val']).

    valid_kv: the valid K/V positions per sequence in this step, for the ideal and
    for ops whose KV lengths are a tensor (None: every cache slot is valid)."""
    from .passes.registry import ATTENTION_OPS, WRITER_OPS

    graph = graph.graph if isinstance(graph, torch.fx.GraphModule) else graph
    nodes = list(graph.nodes)
    attention = [n for n in nodes if n.op == "call_function" and n.target in ATTENTION_OPS]
    caches: set[torch.fx.Node] = set()
    for n in attention:
        spec = ATTENTION_OPS[n.target]
        for index in (spec.key_arg, spec.value_arg):
            if index < len(n.args):
                caches.add(_root(n.args[index]))
    for n in nodes:
        if n.op == "call_function" and n.target in WRITER_OPS:
            caches.update(_root(n.args[i]) for i in WRITER_OPS[n.target].cache_args)
        elif n.op == "call_function" and (n.target in _FUNCTIONAL_WRITERS or n.target in _IN_PLACE_WRITERS) \
                and isinstance(_root(n.args[0]), torch.fx.Node) and _root(n.args[0]).op == "placeholder":
            caches.add(_root(n.args[0]))  # an un-rewritten cache write (index_copy into a cache input)
    caches = {c for c in caches if isinstance(c, torch.fx.Node)}
    # Functional writes copied back into their own cache input: one in-place write (TorchAir, Inductor).
    in_place_pairs: dict[torch.fx.Node, torch.fx.Node] = {}
    for n in nodes:
        if n.op == "call_function" and n.target is aten.copy_.default:
            dst, src = n.args[0], n.args[1]
            while isinstance(src, torch.fx.Node) and src.target is operator.getitem:
                src = src.args[0]
            # Only our writers: TorchAir turns writer + copy_ into one in-place GE write (tested); an
            # aten functional write (index_copy) and its copy_ count as the whole copies they are.
            if isinstance(src, torch.fx.Node) and src.op == "call_function" and \
                    src.target in WRITER_OPS and dst in [src.args[i] for i in WRITER_OPS[src.target].cache_args]:
                in_place_pairs[n] = src
    paired_writers = set(in_place_pairs.values())
    for n in nodes:  # a functional write into a fresh tensor nothing else reads (a shifted window): in place
        if n.op == "call_function" and n.target in WRITER_OPS:
            target = n.args[WRITER_OPS[n.target].cache_args[0]]
            if isinstance(target, torch.fx.Node) and target.op == "call_function" and len(target.users) == 1:
                paired_writers.add(n)
    derived = _derived_from(nodes, caches)

    ops, ideal, fp32_cache_casts = [], Ideal(), 0
    for n in nodes:
        if n.op == "placeholder":
            continue
        if _is_free(n):
            continue
        args = _tensor_args(n)
        note, flag = "", None
        if n in in_place_pairs:
            continue  # counted with its writer
        if n.target in ATTENTION_OPS:
            spec = ATTENTION_OPS[n.target]
            share, note = _kv_fraction(n, valid_kv)
            kv = [n.args[i] for i in (spec.key_arg, spec.value_arg) if i < len(n.args)]
            read = sum(tensor_bytes(dynamo_val(a)) * (share if a in kv else 1) for a in args)
            written = _out_bytes(n)
            ideal.kv_read += sum(tensor_bytes(dynamo_val(a)) * share for a in kv if _root(a) not in caches)
            if dynamo_val(kv[0]) is not None and dynamo_val(kv[0]).dtype == torch.float32 and any(_root(a) in caches for a in kv):
                # GE runs the op in float16: read the float32 K/V, write a float16 copy, each step.
                fp32_cache_casts += sum(tensor_bytes(dynamo_val(a)) for a in kv) * 3 // 2
            ops.append(OpBytes(n.name, _target(n), int(read), written, note.lstrip("; ")))
            continue
        if n.target in WRITER_OPS or n.target in _IN_PLACE_WRITERS or n.target in _FUNCTIONAL_WRITERS:
            writer = WRITER_OPS.get(n.target)
            cache_idx = writer.cache_args if writer else (0,)
            rows = [a for i, a in enumerate(n.args) if isinstance(a, torch.fx.Node) and i not in cache_idx
                    and isinstance(dynamo_val(a), torch.Tensor)]
            rows += [a for a in n.kwargs.values() if isinstance(a, torch.fx.Node) and isinstance(dynamo_val(a), torch.Tensor)]
            values = [a for a in rows if dynamo_val(a).is_floating_point()]
            new = sum(tensor_bytes(dynamo_val(a)) for a in values)
            ideal.kv_written += new
            in_place = (writer is not None and n.target is writer.in_place) or n.target in _IN_PLACE_WRITERS \
                or n in paired_writers
            if in_place:
                ops.append(OpBytes(n.name, _target(n), sum(tensor_bytes(dynamo_val(a)) for a in rows), new,
                                   "in place" if n not in paired_writers else "in place (functional write + copy_ "
                                   "back into the same cache)"))
            else:
                read = sum(tensor_bytes(dynamo_val(a)) for a in args)
                ops.append(OpBytes(n.name, _target(n), read, _out_bytes(n),
                                   "functional write: a new copy of the whole cache", "copy"))
            continue
        if n.target in _GATHERS:
            out = _out_bytes(n)
            index_bytes = sum(tensor_bytes(dynamo_val(a)) for a in args[1:])
            ops.append(OpBytes(n.name, _target(n), out + index_bytes, out, "gather: reads the rows it returns"))
            continue
        read = sum(tensor_bytes(dynamo_val(a)) for a in args)
        written = _out_bytes(n)
        if n.target is aten.copy_.default and args:
            read, written = tensor_bytes(dynamo_val(n.args[1])), tensor_bytes(dynamo_val(n.args[0]))
        sources = [derived[a] for a in args if a in derived]
        if n.target is aten.copy_.default and _root(n.args[0]) in caches:
            sources.append(tensor_bytes(dynamo_val(_root(n.args[0]))))
        if sources and max(read, written) >= min(sources) // 2:
            flag, note = _classify(n)
        ops.append(OpBytes(n.name, _target(n), read, written, note, flag))
    ideal.weights = _weight_bytes(nodes, caches)
    for c in caches:  # each cache's valid part read once (a (B, N, S, D) cache: S is dim -2)
        value = dynamo_val(c)
        if isinstance(value, torch.Tensor) and value.dim() >= 2:
            seq = int(value.shape[-2]) if value.dim() == 4 else int(value.shape[1])
            ideal.kv_read += tensor_bytes(value) * (1.0 if valid_kv is None else min(1.0, valid_kv / max(seq, 1)))
    notes = []
    if fp32_cache_casts:
        notes.append(f"float32 attention over KV caches: bound for GE (fp32_attention 'float16') its K/V are cast "
                     f"whole each step, {mib(fp32_cache_casts)} more per call; remedy: {REMEDY['cast']}")
    return Traffic("fx", ops, ideal, valid_kv, notes)


def _derived_from(nodes: list[torch.fx.Node], roots: set[torch.fx.Node]) -> dict[torch.fx.Node, int]:
    """The nodes holding at least half a cache's worth of values made from that cache -> the cache's bytes."""
    derived = {r: tensor_bytes(dynamo_val(r)) for r in roots}
    for n in nodes:
        if n.op != "call_function":
            continue
        sizes = [derived[a] for a in _tensor_args(n) if a in derived]
        if sizes and _out_bytes(n) >= min(sizes) // 2:
            derived[n] = min(sizes)
    return derived


def _classify(n: torch.fx.Node) -> tuple[str, str]:
    name = _target(n)
    if n.target in _CASTS:
        src, dst = dynamo_val(n.args[0]), dynamo_val(n)
        return "cast", f"cast of a whole KV cache ({_dtype(src)} -> {_dtype(dst)})"
    if "roll" in name:
        return "roll", "roll of a whole KV cache"
    if n.target is aten.cat.default and len({_root(a) for a in n.args[0]}) == 1:
        return "roll", "shift of a whole KV cache by one slot (cat of its two slices: the sliding-window roll)"
    if n.target in _MATERIALISE:
        return "repeat_kv", "materialised copy of a whole KV cache (repeat_kv / clone / cat)"
    if n.target is aten.copy_.default:
        return "copy", "copy_ of a whole KV cache"
    return "other", f"{name} over a whole KV cache"


def _dtype(t: Any) -> str:
    return str(t.dtype).replace("torch.", "") if isinstance(t, torch.Tensor) else "?"


def _weight_bytes(nodes: list[torch.fx.Node], caches: set[torch.fx.Node]) -> int:
    """Floating graph inputs other than the caches, read once; an input read only by gathers: the rows."""
    from .passes._fx import is_view

    total = 0
    for n in nodes:
        value = dynamo_val(n)
        if n.op not in ("placeholder", "get_attr") or n in caches or not isinstance(value, torch.Tensor) \
                or not value.is_floating_point():
            continue
        readers, todo, gathered = [], [n], 0
        while todo:
            for user in todo.pop().users:
                if user.op == "call_function" and (is_view(user) or user.target in _FREE):
                    todo.append(user)
                else:
                    readers.append(user)
        if readers and all(r.target in _GATHERS for r in readers):
            gathered = sum(_out_bytes(r) for r in readers)
            total += min(gathered, tensor_bytes(value))
        else:
            total += tensor_bytes(value)
    return total


def _target(n: torch.fx.Node) -> str:
    text = str(n.target)
    return text.replace("aten.", "").replace(".default", "") if not text.startswith("<") else \
        getattr(n.target, "__name__", text)


# ---------------------------------------------------------------------------- GE

# GE ops that move no data (or that GE folds into their consumer, below).
_GE_FREE = {"Data", "Const", "Constant", "NetOutput", "Reshape", "Unsqueeze", "Squeeze", "ExpandDims", "Identity",
            "Flatten", "FlattenV2", "Shape", "Size", "Variable", "RefData"}
_GE_MATMULS = {"MatMul", "MatMulV2", "BatchMatMul", "BatchMatMulV2"}
_GE_ATTENTION = {"IncreFlashAttention": 5, "PromptFlashAttention": 6, "FusedInferAttentionScore": 6}
_GE_IN_PLACE = {"Scatter": (1, 2), "ScatterNdUpdate": (1, 2), "ScatterPaKvCache": (0, 1, 4)}
_GE_ITEMSIZE = {"DT_FLOAT": 4, "DT_FLOAT16": 2, "DT_BF16": 2, "DT_INT8": 1, "DT_UINT8": 1, "DT_INT16": 2,
                "DT_UINT16": 2, "DT_INT32": 4, "DT_UINT32": 4, "DT_INT64": 8, "DT_UINT64": 8, "DT_BOOL": 1,
                "DT_DOUBLE": 8}


def ge_traffic(graph_def: Any, ideal: Ideal, valid_kv: int | None = None, kv_len: int | None = None) -> Traffic:
    """The bytes of one run of a GE graph (TorchAir's GraphDef), against `ideal` (fx_traffic's, for the same
    step). kv_len: the cache length, to scale attention reads by valid_kv where the op is given its KV lengths.
    A Transpose read only by MatMuls is counted free (GE folds it into the MatMul's transpose attribute)."""
    from torchair._ge_concrete_graph import ge_ir_pb2

    name_of = ge_ir_pb2.DataType.Name
    by_name = {op.name: op for op in graph_def.op}
    consumers: dict[str, list[Any]] = {}
    for op in graph_def.op:
        for ref in op.input:
            if ref and not ref.startswith("^"):
                consumers.setdefault(ref.rsplit(":", 1)[0], []).append(op)

    shapes: dict[tuple[str, int], tuple[list[int], int]] = {}  # (op, output) -> (shape, itemsize)

    def output_shape(name: str, index: int, depth: int = 0) -> tuple[list[int], int] | None:
        """TorchAir records each output's torch meta as text (attr _meta); an op it inserted without one
        (a converter's Cast) takes its first input's shape and its own dtype."""
        if (name, index) in shapes:
            return shapes[(name, index)]
        op = by_name.get(name)
        if op is None or index >= len(op.output_desc) or depth > 32:
            return None
        desc = op.output_desc[index]
        itemsize = _GE_ITEMSIZE.get(name_of(desc.dtype), 4)
        meta = desc.attr["_meta"].s.decode() if "_meta" in desc.attr else ""
        found = re.search(r"shape=torch\.Size\(\[([^\]]*)\]\)", meta)
        result = None
        if found:
            dims = [d.strip() for d in found[1].split(",") if d.strip()]
            if all(d.lstrip("-").isdigit() for d in dims):
                result = ([int(d) for d in dims], itemsize)
        elif op.input and op.input[0] and not op.input[0].startswith("^"):
            source, _, at = op.input[0].rpartition(":")
            upstream = output_shape(source, int(at), depth + 1)
            result = (upstream[0], itemsize) if upstream else None
        shapes[(name, index)] = result
        return result

    def input_bytes(ref: str) -> int:
        if not ref or ref.startswith("^"):
            return 0
        name, _, index = ref.rpartition(":")
        shape = output_shape(name, int(index))
        return math.prod(shape[0]) * shape[1] if shape else 0

    def out_bytes(op) -> int:
        total = 0
        for i in range(len(op.output_desc)):
            shape = output_shape(op.name, i)
            total += math.prod(shape[0]) * shape[1] if shape else 0
        return total

    ops: list[OpBytes] = []
    notes = []
    # Outputs holding at least half a cache's worth of values made from a cache -> that cache's bytes
    # (seeds: what the in-place writers update, and the Data inputs attention reads its K/V from).
    derived: dict[str, int] = {}
    for op in graph_def.op:
        if op.type == "Scatter" and op.input:  # the KV writer (ScatterNdUpdate: MoE's permutation)
            derived[op.input[0].rsplit(":", 1)[0]] = input_bytes(op.input[0])
        for ref in op.input[1:3] if op.type in _GE_ATTENTION else ():
            source = by_name.get(ref.rsplit(":", 1)[0]) if ref else None
            while source is not None and source.type != "Data" and source.input:
                source = by_name.get(source.input[0].rsplit(":", 1)[0])
            if source is not None and source.type == "Data":
                derived[source.name] = input_bytes(f"{source.name}:0")
    for op in graph_def.op:
        sizes = [derived[ref.rsplit(":", 1)[0]] for ref in op.input if ref and ref.rsplit(":", 1)[0] in derived]
        if op.type not in _GE_ATTENTION and op.name not in derived and sizes and out_bytes(op) >= min(sizes) // 2:
            derived[op.name] = min(sizes)
    for op in graph_def.op:
        if op.type in _GE_FREE:
            continue
        if op.type == "Transpose" and all(c.type in _GE_MATMULS for c in consumers.get(op.name, [])):
            continue
        inputs = [ref for ref in op.input if ref and not ref.startswith("^")]
        written = out_bytes(op)
        note, flag = "", None
        if op.type in _GE_ATTENTION:
            lengths_at = _GE_ATTENTION[op.type]
            has_lengths = len(op.input) > lengths_at and bool(op.input[lengths_at])
            share = min(1.0, valid_kv / kv_len) if has_lengths and valid_kv and kv_len else 1.0
            read = sum(input_bytes(ref) * (share if i in (1, 2) else 1) for i, ref in enumerate(op.input))
            note = "reads the valid K/V (actual_seq_lengths)" if has_lengths else "reads all of K/V (no KV lengths)"
            ops.append(OpBytes(op.name, op.type, int(read), written, note))
            continue
        if op.type in ("GatherV2", "Gather", "GatherNd") and len(inputs) >= 2:  # reads the rows it returns
            ops.append(OpBytes(op.name, op.type, written + input_bytes(inputs[1]), written,
                               "gather: reads the rows it returns"))
            continue
        if op.type in _GE_IN_PLACE:
            read = sum(input_bytes(op.input[i]) for i in _GE_IN_PLACE[op.type] if i < len(op.input))
            new = input_bytes(op.input[2]) if op.type != "ScatterPaKvCache" else \
                input_bytes(op.input[0]) + input_bytes(op.input[1])
            ops.append(OpBytes(op.name, op.type, read, new, "in place"))
            continue
        read = sum(input_bytes(ref) for ref in inputs)
        sizes = [derived[ref.rsplit(":", 1)[0]] for ref in inputs if ref.rsplit(":", 1)[0] in derived]
        if sizes and max(read, written) >= min(sizes) // 2:
            kind = {"Cast": "cast", "TensorMove": "copy", "Assign": "copy", "Roll": "roll",
                    "BroadcastTo": "repeat_kv", "Tile": "repeat_kv", "ConcatV2": "repeat_kv"}.get(op.type, "other")
            flag, note = kind, f"{op.type} of a whole KV cache"
        ops.append(OpBytes(op.name, op.type, read, written, note, flag))
    if any(o.op == "MatMul" for o in ops):
        notes.append("a Transpose read only by MatMuls is counted free (GE folds it into the MatMul)")
    return Traffic("ge", ops, ideal, valid_kv, notes)


def report_traffic(report: Any, ge_graphs: list[Any] | None = None, valid_kv: int | None = None) -> list[Traffic]:
    """fx_traffic of each graph in a Report (its graphs just after the passes), then ge_traffic of each GE
    graph (to_ge_graph's GeGraph list, paired with the FX graphs in order) against the same ideal."""
    fx = [fx_traffic(g, valid_kv) for g in report.graphs_after]
    ge = []
    if ge_graphs and len(ge_graphs) == len(fx):
        ge = [ge_traffic(g.graph_def, t.ideal, valid_kv) for g, t in zip(ge_graphs, fx)]
    return fx + ge


def report_lines(report: Any, ge_graphs: list[Any] | None = None, top: int = 3) -> list[str]:
    """What explain and dump print: bytes per call against the ideal, the top ops, the whole-cache ops."""
    lines = ["memory traffic per call (views free; every cache slot counted valid; "
             "bench/decode_traffic.py measures a decode step at a given valid length):"]
    for t in report_traffic(report, ge_graphs):
        lines += [f"  {line}" for line in t.lines(top)]
    return lines


__all__ = ["Ideal", "OpBytes", "REMEDY", "Traffic", "fx_traffic", "ge_traffic", "mib", "report_lines", "report_traffic",
           "tensor_bytes"]
