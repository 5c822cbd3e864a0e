"""Random attention and KV-cache programs for fuzzing the npu_attn backend, as Python source text.

Hypothesis strategies draw a *description* of a program (small frozen dataclasses: Dims, Mask, Site, and one
program class per family), so Hypothesis can shrink it; ``render_*`` turns a description into the source of a
self-contained module:

    DTYPE, DYNAMIC, EXPECTED        the model dtype, torch.compile(dynamic=...), and how many attention-shaped
                                    sites / in-place cache writes the backend's report must list
    repeat_kv (if used)             transformers' helper, verbatim in spirit
    f(...) or class Model           the program (a Model holds KV caches as registered buffers)
    make_case() -> (fn, steps)      inputs from a fixed generator seed; one argument tuple per call (KV programs
                                    call several times with advancing positions; the caches are shared)

``render_script`` appends the oracle (oracle.PORTABLE) and a ``__main__`` block, so every failure is a standalone
reproduction: ``python repro.py`` compiles it and compares with eager and an fp64 evaluation.

Families (one strategy each; ``FAMILIES`` maps names to strategies):
- ``sdpa``: F.scaled_dot_product_attention with every mask shape/kind, is_causal, scale, enable_gqa / repeat_kv
  forms, dropout_p=0, layouts;
- ``eager``: hand-written attention: q @ k^T / matmul / bmm on flattened operands / einsum, scale on scores, q or
  k, or a runtime scalar; masks by +float, +bool (a +1.0 bias, not a mask), masked_fill, where; softmax spellings
  with float32 upcasts, and decoys (softmax over the query dim, log_softmax, views that relabel dims);
- ``kv``: static-cache writes (index_copy_, index_put_, slice assignment, negative slices, out-of-place
  index_copy / slice_scatter / clone-then-write) with positions built in many ways, caches as inputs or module
  buffers, several decode steps, cache views taken before the write, attention over the cache after it;
- ``paged``: vLLM-style ``cache.view(-1, N, D)[slot_mapping] = key`` for a key and a value cache;
- ``stacked``: two attention sites, the first one's output feeding the second's query/key/value, or independent;
- ``router``: MoE routers, linear logits -> top-k and softmax in either order (gpt-oss, Qwen-MoE, Mixtral's
  renormalisation), upcasts, 2-D to 4-D tokens, extra readers, and decoys (smallest, unsorted, other dims).

Programs are valid eager PyTorch by construction (the oracle discards any whose eager run raises); decoys are
programs the backend must either handle correctly or leave alone.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from hypothesis import strategies as st

from . import oracle

DTYPES = ("float32", "float16", "bfloat16")

# attn_mask shapes, by name; every one broadcasts against (B, N, S_q, S_kv) scores.
MASK_SHAPES = ("b1qk", "qk", "11qk", "b11k", "111k", "bnqk", "nqk", "1qk")


@dataclass(frozen=True)
class Dims:
    b: int
    nq: int  # query heads
    nkv: int  # key/value heads (nq is a multiple)
    sq: int
    skv: int
    d: int  # query/key head dim
    dv: int  # value head dim

    @property
    def ratio(self) -> int:
        return self.nq // self.nkv

    def mask_shape(self, kind: str) -> tuple[int, ...]:
        b, n, q, k = self.b, self.nq, self.sq, self.skv
        return {"qk": (q, k), "11qk": (1, 1, q, k), "b1qk": (b, 1, q, k), "b11k": (b, 1, 1, k),
                "111k": (1, 1, 1, k), "bnqk": (b, n, q, k), "nqk": (n, q, k), "1qk": (1, q, k)}[kind]


@dataclass(frozen=True)
class Mask:
    how: str  # sdpa_bool / sdpa_float (attn_mask=); add_float / add_bool / masked_fill / where (hand-written)
    fill: str  # what masked positions get: "-inf", "min" (finfo.min); "bias": an arbitrary float bias;
    #            "bool": add_bool adds the keep mask itself (+1.0 / +0.0)
    shape: str  # a MASK_SHAPES name
    build: str  # float masks: "input" (passed in), or built in the function from a bool keep mask by
    #             "where" (torch.where(keep, 0, fill)) or "fill" (zeros.masked_fill(~keep, fill))
    full_row: bool  # some query row (or, for (B,1,1,S_kv), a batch) has every key masked


@dataclass(frozen=True)
class Site:
    """One attention site over BNSD q and BNSD k/v with dims.nkv heads."""

    spelling: str  # sdpa / at (q @ k^T) / matmul / bmm / einsum
    gqa: str  # none / enable_gqa / repeat_kv / repeat_interleave / expand
    scale: str  # sdpa: default / custom; hand: div / div_size / mul / q / k / none / tensor / pyfloat
    scale_value: float
    mask: Mask | None = None
    causal: str = "none"  # none / is_causal (sdpa) / tril_tl / tril_br (hand-written, top-left / bottom-right)
    causal_fill: str = "-inf"
    softmax: str = "method"  # method / F / upcast_back / upcast_float / upcast_keep / decoy_dim / decoy_log
    pv: str = "matmul"  # matmul / to_v (probs.to(v.dtype)) / v_float (probs @ v.float())
    softcap: bool = False
    # none / per_head (gpt-oss: one logit per head joins the softmax, dropped after it) / per_head_max (the same
    # with gpt-oss's row-max subtraction) / per_row (a decoy: the column differs per query row, not a sink)
    sink: str = "none"
    dropout: bool = False  # F.dropout(training=False) on the probabilities
    return_weights: bool = False
    explicit_dropout_p: bool = False  # sdpa: dropout_p=0.0 spelled out
    flat_decoy: str = ""  # bmm: "q" / "v" arrives BSND and is flattened as if BNSD
    bmm_out: str = "bnsd"  # bmm: the (B*N, S_q, D_v) result viewed as "bnsd", or "nbsd" (a decoy: other labels)

    @property
    def attention_shaped(self) -> bool:
        """Softmax over the key axis feeding a matmul with the values (decoys over other axes are not)."""
        return self.softmax not in ("decoy_dim", "decoy_log")


@dataclass(frozen=True)
class AttentionProgram:
    family: str  # sdpa / eager
    dtype: str
    dynamic: bool
    dims: Dims
    site: Site
    layout: str  # inputs: bnsd / bsnd (transposed in the function) / proj (linear projections of x)
    out_layout: str  # bnsd / bsh (transpose back + reshape) / nbsd (decoy: relabelled as (N, B, S, D))
    seed: int


@dataclass(frozen=True)
class StackedProgram:
    dtype: str
    dynamic: bool
    chain: str  # query / value / kv (site 1's output is site 2's ...) / independent / shared_kv
    dims1: Dims
    site1: Site
    dims2: Dims
    site2: Site
    seed: int


@dataclass(frozen=True)
class KvProgram:
    dtype: str
    dynamic: bool
    holder: str  # args / buffers
    b: int
    nkv: int
    nq: int
    s: int  # new tokens per step
    d: int
    length: int  # cache length
    write: str  # see KV_WRITES
    positions: str  # see POSITIONS
    steps: int
    start0: int
    read_before: str  # none / view / clone: old = cache[:, :, :2] taken before the write, returned after it
    read: Site | None  # attention over the cache after the write
    seed: int


@dataclass(frozen=True)
class PagedProgram:
    dtype: str
    dynamic: bool
    holder: str
    blocks: int
    block_size: int
    heads: int
    d: int
    tokens: int
    cache_layout: str  # bsnd: (blocks, block_size, N, D) / bsh: (blocks, block_size, N * D)
    key_write: str  # index_put / index_copy_ / rows_index_copy_ (a (slots, N * D) view) / block_offset
    value_write: str
    slot_dtype: str
    steps: int
    read: str  # none / gather / attention
    seed: int


@dataclass(frozen=True)
class RouterProgram:
    """A MoE router: logits = linear(x), then top-k and softmax in either order (transformers' routers and
    decoys the router rule must leave alone)."""

    dtype: str
    dynamic: bool
    shape: str  # x: "ts" (tokens, H) / "bsh" (B, S, H) / "bs2h" (B, S, 2, H): 4-D, which the op refuses
    experts: int
    k: int
    bias: bool
    order: str  # topk_softmax (gpt-oss) / softmax_topk (Qwen-MoE, Mixtral)
    upcast: str  # none / float (logits.float()) / softmax_dtype (softmax(..., dtype=torch.float32))
    softmax: str  # torch / F / method
    renormalise: bool  # softmax_topk: top / top.sum(-1, keepdim=True) (Mixtral)
    topk_dim: str  # last (-1) / positive (rank - 1) / first (decoy: dim 0)
    largest: bool  # False: a decoy (the k smallest)
    sorted: bool  # False: a decoy (order unspecified)
    softmax_dim: str  # last / first (decoy)
    extra: str  # none / probs (softmax_topk: the probabilities also returned) / top (topk_softmax: the logits)
    seed: int


@dataclass
class Program:
    family: str
    description: object
    source: str  # the module (no oracle); render_script adds it
    expected: dict[str, int]
    tags: tuple[str, ...] = ()
    signature: str = ""  # the few features that usually decide a defect (for grouping failures)

    @property
    def script(self) -> str:
        return render_script(self)

    def __repr__(self) -> str:  # Hypothesis prints the falsifying example; the script is printed separately
        return f"Program({self.family}: {', '.join(self.tags)})"


# ----------------------------------------------------------------------------------------------------------------
# Rendering


def _tuple(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"


class Builder:
    """Collects a program's parameters (with the make_case code that creates them) and its body lines."""

    def __init__(self) -> None:
        self.params: list[str] = []
        self.buffers: list[str] = []  # cache parameters that become module buffers (holder == "buffers")
        self.fixed: list[str] = []  # make_case lines, once
        self.per_step: list[str] = []  # make_case lines, once per step
        self.body: list[str] = []
        self.helpers: list[str] = []
        self.outputs: list[str] = []

    def fixed_input(self, name: str, *lines: str) -> str:
        self.params.append(name)
        self.fixed.extend(lines or (f"{name} = {name}",))
        return name

    def step_input(self, name: str, *lines: str) -> str:
        self.params.append(name)
        self.per_step.extend(lines)
        return name

    def line(self, *lines: str) -> None:
        self.body.extend(lines)

    def helper(self, source: str) -> None:
        if source not in self.helpers:
            self.helpers.append(source)


REPEAT_KV = '''def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """transformers' repeat_kv: (B, N_kv, S, D) -> (B, N_kv * n_rep, S, D)."""
    b, n, s, d = x.shape
    if n_rep == 1:
        return x
    return x[:, :, None, :, :].expand(b, n, n_rep, s, d).reshape(b, n * n_rep, s, d)'''


def _fill(fill: str, like: str) -> str:
    return 'float("-inf")' if fill == "-inf" else f"torch.finfo({like}.dtype).min"


def _keep_lines(name: str, shape_kind: str, shape: tuple[int, ...], full_row: bool) -> list[str]:
    lines = [f"{name} = torch.rand({_tuple(shape)}, generator=g) > 0.3",
             f"{name}[..., 0] = True  # every query row keeps key 0"]
    if full_row:
        if shape_kind == "b11k":
            lines.append(f"{name}[-1] = False  # the last batch attends to no key")
        else:
            lines.append(f"{name}[..., {shape[-2] - 1}, :] = False  # the last query row attends to no key")
    return lines


def render_mask(b: Builder, m: Mask, dims: Dims, tag: str) -> str:
    """Parameters (and body lines) for a mask; returns the expression the site uses (bool keep or float mask)."""
    shape = dims.mask_shape(m.shape)
    if m.fill == "bias":  # an arbitrary additive float bias: nothing is masked
        return b.fixed_input(f"bias{tag}", f"bias{tag} = randn({', '.join(map(str, shape))}, scale=2.0)")
    keep = f"keep{tag}"
    needs_float = m.how in ("sdpa_float", "add_float")
    if needs_float and m.build == "input":
        name = f"mask{tag}"
        value = 'float("-inf")' if m.fill == "-inf" else "torch.finfo(DTYPE).min"
        return b.fixed_input(name, *_keep_lines(keep, m.shape, shape, m.full_row),
                             f"{name} = torch.where({keep}, 0.0, {value}).to(DTYPE)  # keep -> 0")
    b.fixed_input(keep, *_keep_lines(keep, m.shape, shape, m.full_row))
    if not needs_float:
        return keep
    name, fill = f"mask{tag}", _fill(m.fill, f"q{tag}")
    if m.build == "where" and m.fill == "-inf":
        b.line(f"{name} = torch.where({keep}, 0.0, {fill}).to(q{tag}.dtype)")
    elif m.build == "where":  # a dtype-typed zero: finfo(float64).min would not fit the float32 of where(keep, 0.0, ..)
        b.line(f"{name} = torch.where({keep}, torch.zeros((), dtype=q{tag}.dtype), {fill})")
    else:
        b.line(f"{name} = torch.zeros({keep}.shape, dtype=q{tag}.dtype).masked_fill(~{keep}, {fill})")
    return name


def render_site(b: Builder, s: Site, dims: Dims, q: str, k: str, v: str, tag: str = "") -> tuple[str, str | None]:
    """Body lines of one attention site; returns (output name (B, N_q, S_q, D_v), attention weights name or None).

    The mask (if any) is built from parameters named with `tag`, and a graph-built mask reads q{tag}'s dtype, so
    the caller names its query q{tag}."""
    mask = render_mask(b, s.mask, dims, tag) if s.mask else None
    r = dims.ratio
    if s.gqa in ("repeat_kv", "repeat_interleave", "expand"):
        for name in (k, v):
            if s.gqa == "repeat_kv":
                b.helper(REPEAT_KV)
                b.line(f"{name}_rep = repeat_kv({name}, {r})")
            elif s.gqa == "repeat_interleave":
                b.line(f"{name}_rep = {name}.repeat_interleave({r}, dim=1)")
            else:
                b.line(f"{name}_rep = {name}.unsqueeze(2).expand(-1, -1, {r}, -1, -1).flatten(1, 2)")
        k, v = f"{k}_rep", f"{v}_rep"
    out = f"out{tag}"
    if s.spelling == "sdpa":
        kwargs = []
        if mask:
            kwargs.append(f"attn_mask={mask}")
        if s.explicit_dropout_p:
            kwargs.append("dropout_p=0.0")
        if s.causal == "is_causal":
            kwargs.append("is_causal=True")
        if s.scale == "custom":
            kwargs.append(f"scale={s.scale_value!r}")
        if s.gqa == "enable_gqa":
            kwargs.append("enable_gqa=True")
        b.line(f"{out} = F.scaled_dot_product_attention({', '.join([q, k, v] + kwargs)})")
        return out, None
    return _render_hand_site(b, s, dims, q, k, v, mask, tag)


def _render_hand_site(b: Builder, s: Site, dims: Dims, q: str, k: str, v: str, mask: str | None,
                      tag: str) -> tuple[str, str | None]:
    scores, probs, out = f"scores{tag}", f"probs{tag}", f"out{tag}"
    val = repr(s.scale_value)
    if s.scale == "q":
        b.line(f"{q}_scaled = {q} * {val}")
        q = f"{q}_scaled"
    elif s.scale == "k":
        b.line(f"{k}_scaled = {k} * {val}")
        k = f"{k}_scaled"
    if s.spelling == "bmm":  # flattened (B*N, S, D) operands, as GPT-2 / BERT-style code and Inductor write it
        bsz, heads, q_len, kv_len, dim, vdim = (f"{n}{tag}" for n in ("bsz", "heads", "q_len", "kv_len", "dim",
                                                                        "vdim"))
        if s.flat_decoy == "q":  # q is (B, S_q, N, D) but flattened below as if it were (B, N, S_q, D)
            b.line(f"{bsz}, {q_len}, _, {dim} = {q}.shape", f"{heads}, {kv_len} = {k}.shape[1], {k}.shape[2]")
        else:
            b.line(f"{bsz}, {heads}, {q_len}, {dim} = {q}.shape", f"{kv_len} = {k}.shape[2]")
        b.line(f"{vdim} = {v}.shape[3]")
        b.line(f"{scores} = torch.bmm({q}.reshape({bsz} * {heads}, {q_len}, {dim}), "
               f"{k}.transpose(-1, -2).reshape({bsz} * {heads}, {dim}, {kv_len})).view({bsz}, {heads}, {q_len}, "
               f"{kv_len})")
    elif s.spelling == "matmul":
        b.line(f"{scores} = torch.matmul({q}, {k}.transpose(2, 3))")
    elif s.spelling == "einsum":
        b.line(f'{scores} = torch.einsum("bhqd,bhkd->bhqk", {q}, {k})')
    else:
        b.line(f"{scores} = {q} @ {k}.transpose(-2, -1)")
    if s.scale == "div":
        b.line(f"{scores} = {scores} / math.sqrt({dims.d})")
    elif s.scale == "div_size":
        b.line(f"{scores} = {scores} / math.sqrt({q}.size(-1))")
    elif s.scale == "mul":
        b.line(f"{scores} = {scores} * {val}")
    elif s.scale in ("tensor", "pyfloat"):  # a runtime scalar: not a constant the fused ops can take
        name = f"scale{tag}"
        b.fixed_input(name, f"{name} = torch.tensor({val}, dtype=DTYPE)" if s.scale == "tensor" else
                      f"{name} = {val}")
        b.line(f"{scores} = {scores} * {name}")
    if s.softcap:  # Gemma-2 style logit soft-capping: still attention-shaped
        b.line(f"{scores} = torch.tanh({scores} / 20.0) * 20.0")
    if s.sink != "none":
        name = f"sinks{tag}"
        if s.sink == "per_row":
            column = b.fixed_input(name, f"{name} = randn({dims.b}, {dims.nq}, {dims.sq}, 1)")
        else:
            b.fixed_input(name, f"{name} = randn({dims.nq})")
            column = f"column{tag}"
            b.line(f"{column} = {name}.reshape(1, -1, 1, 1).expand({scores}.shape[0], -1, {scores}.shape[-2], -1)")
    if s.causal in ("tril_tl", "tril_br"):
        diag = "0" if s.causal == "tril_tl" else f"{scores}.shape[-1] - {scores}.shape[-2]"
        b.line(f"causal{tag} = torch.ones({scores}.shape[-2], {scores}.shape[-1], dtype=torch.bool).tril({diag})",
               f"{scores} = {scores}.masked_fill(~causal{tag}, {_fill(s.causal_fill, scores)})")
    if s.mask is not None:
        how = s.mask.how
        if how in ("add_float", "add_bool"):  # a bool tensor added is +1.0 / +0.0, a bias, not a mask
            b.line(f"{scores} = {scores} + {mask}")
        elif how == "masked_fill":
            b.line(f"{scores} = {scores}.masked_fill(~{mask}, {_fill(s.mask.fill, scores)})")
        else:
            b.line(f"{scores} = torch.where({mask}, {scores}, {_fill(s.mask.fill, scores)})")
    if s.sink != "none":
        b.line(f"{scores} = torch.cat([{scores}, {column}.to({scores}.dtype)], dim=-1)")
        if s.sink == "per_head_max":
            b.line(f"{scores} = {scores} - {scores}.max(dim=-1, keepdim=True).values")
    b.line(f"{probs} = " + {
        "method": f"{scores}.softmax(-1)",
        "F": f"F.softmax({scores}, dim=-1)",
        "upcast_back": f"F.softmax({scores}, dim=-1, dtype=torch.float32).to({q}.dtype)",
        "upcast_float": f"{scores}.float().softmax(-1).type_as({q})",
        "upcast_keep": f"F.softmax({scores}, dim=-1, dtype=torch.float32)",
        "decoy_dim": f"{scores}.softmax(-2)",  # over the query axis: not attention
        "decoy_log": f"F.log_softmax({scores}, dim=-1)",  # not a probability
    }[s.softmax])
    if s.sink != "none":
        b.line(f"{probs} = {probs}[..., :-1]  # the sink column dropped")
    if s.dropout:
        b.line(f"{probs} = F.dropout({probs}, p=0.1, training=False)")
    p = f"{probs}.to({v}.dtype)" if s.pv == "to_v" else probs
    vv = f"{v}.float()" if s.pv == "v_float" else v
    if s.spelling == "bmm":
        view = f"{heads}, {bsz}" if s.bmm_out == "nbsd" else f"{bsz}, {heads}"
        b.line(f"{out} = torch.bmm({p}.reshape({bsz} * {heads}, {q_len}, {kv_len}), {vv}.reshape({bsz} * {heads}, "
               f"{kv_len}, {vdim})).view({view}, {q_len}, {vdim})")
    elif s.spelling == "matmul":
        b.line(f"{out} = torch.matmul({p}, {vv})")
    elif s.spelling == "einsum":
        b.line(f'{out} = torch.einsum("bhqk,bhkd->bhqd", {p}, {vv})')
    else:
        b.line(f"{out} = {p} @ {vv}")
    return out, probs if s.return_weights else None


def _function_source(b: Builder, holder: str = "args") -> str:
    """`def f(...)`, or a Model whose buffers are the cache parameters."""
    body = b.body + [f"return {', '.join(b.outputs)}" if b.outputs else "return None"]
    if holder == "buffers":
        args = [p for p in b.params if p not in b.buffers]
        init = ", ".join(b.buffers)
        lines = ["class Model(nn.Module):", f"    def __init__(self, {init}):", "        super().__init__()"]
        lines += [f'        self.register_buffer("{n}", {n})' for n in b.buffers]
        lines += ["", f"    def forward(self, {', '.join(args)}):",
                  f"        {', '.join(b.buffers)}{',' if len(b.buffers) == 1 else ''} = "
                  f"{', '.join('self.' + n for n in b.buffers)}"]
        lines += [f"        {ln}" for ln in body]
        return "\n".join(lines)
    return "\n".join([f"def f({', '.join(b.params)}):"] + [f"    {ln}" for ln in body])


def _module_source(b: Builder, *, family: str, dtype: str, dynamic: bool, expected: dict[str, int], seed: int,
                   tags: tuple[str, ...], steps: int = 1, holder: str = "args") -> str:
    head = [f'"""Fuzz program, family {family!r} (generated by tests/fuzz/programs.py).',
            "",
            "Features: " + ", ".join(tags) + ".",
            "Run it from the project root with the project's environment: python this_file.py",
            '"""',
            "import math",
            "",
            "import torch",
            "import torch.nn.functional as F",
            "from torch import nn",
            "",
            f"DTYPE = torch.{dtype}",
            f"DYNAMIC = {dynamic}  # torch.compile(dynamic=...)",
            f"TARGET = {('ge' if seed % 4 == 0 else 'torch')!r}  # rewrite as for the eager executor, or as for GE "
            "(run by torch)",
            f"EXPECTED = {expected!r}  # attention-shaped sites / in-place cache writes the report must list"]
    parts = ["\n".join(head)] + [h for h in b.helpers] + [_function_source(b, holder)]
    fn = "Model(" + ", ".join(b.buffers) + ")" if holder == "buffers" else "f"
    args = [p for p in b.params if not (holder == "buffers" and p in b.buffers)]
    call_args = "(" + ", ".join(args) + ("," if len(args) == 1 else "") + ")"
    mk = ["def make_case():", f"    g = torch.Generator().manual_seed({seed})", "",
          "    def randn(*shape, scale=1.0):",
          "        return (torch.randn(*shape, generator=g) * scale).to(DTYPE)", ""]
    mk += [f"    {ln}" for ln in b.fixed]
    if steps == 1:
        mk += [f"    {ln}" for ln in b.per_step]
        mk.append(f"    return {fn}, [{call_args}]")
    else:
        mk += ["    steps = []", f"    for step in range({steps}):"]
        mk += [f"        {ln}" for ln in b.per_step]
        mk += [f"        steps.append({call_args})", f"    return {fn}, steps"]
    parts.append("\n".join(mk))
    return "\n\n\n".join(parts) + "\n"


def render_script(p: Program) -> str:
    """The program plus the oracle and a __main__ block: a standalone reproduction."""
    return (p.source + "\n\n# " + "-" * 70 + "\n# The oracle (copied from tests/fuzz/oracle.py).\n\n"
            "import inspect\nfrom typing import Any, Callable\n\n\n" + oracle.portable_source() + "\n\n"
            'if __name__ == "__main__":\n'
            "    status, detail = check_case(make_case, dynamic=DYNAMIC, expected=EXPECTED, target=TARGET)\n"
            '    print(status, detail)\n'
            '    assert status in ("ok", "discarded"), status\n')


def _bnsd(dims: Dims, which: str) -> tuple[int, ...]:
    n = dims.nq if which == "q" else dims.nkv
    s = dims.sq if which == "q" else dims.skv
    dd = dims.dv if which == "v" else dims.d
    return (dims.b, n, s, dd)


def _site_inputs(b: Builder, dims: Dims, layout: str, decoy: str, tag: str = "") -> tuple[str, str, str]:
    """Parameters and body lines that produce BNSD q/k/v (the decoy operand stays BSND); returns their names."""
    names = {w: f"{w}{tag}" for w in "qkv"}
    if layout == "proj":  # x (B, S_q, E) [and a context (B, S_kv, E)] -> linear -> view BSND -> transpose
        e = 32
        x = b.step_input(f"x{tag}", f"x{tag} = randn({dims.b}, {dims.sq}, {e})")
        ctx = x if dims.skv == dims.sq else b.step_input(f"ctx{tag}", f"ctx{tag} = randn({dims.b}, {dims.skv}, {e})")
        for w, src, heads, dd in (("q", x, dims.nq, dims.d), ("k", ctx, dims.nkv, dims.d),
                                  ("v", ctx, dims.nkv, dims.dv)):
            wname = b.fixed_input(f"w{w}{tag}", f"w{w}{tag} = randn({heads * dd}, {e}, scale={e ** -0.5!r})")
            b.line(f"{names[w]} = F.linear({src}, {wname}).view({src}.shape[0], {src}.shape[1], {heads}, "
                   f"{dd}).transpose(1, 2)")
        return names["q"], names["k"], names["v"]
    for w in "qkv":
        shape = _bnsd(dims, w)
        if layout == "bsnd" or decoy == w:
            shape = (shape[0], shape[2], shape[1], shape[3])
        b.step_input(names[w], f"{names[w]} = randn{_tuple(shape)}")
        if layout == "bsnd" and decoy != w:
            b.line(f"{names[w]} = {names[w]}.transpose(1, 2)")
    return names["q"], names["k"], names["v"]


def _out_layout(b: Builder, out: str, layout: str) -> str:
    if layout == "bsh":
        b.line(f"{out} = {out}.transpose(1, 2).reshape({out}.shape[0], {out}.shape[2], -1)")
    elif layout == "nbsd":  # decoy: the same memory read as (N, B, S, D)
        b.line(f"{out} = {out}.reshape({out}.shape[1], {out}.shape[0], {out}.shape[2], {out}.shape[3])")
    return out


def _site_tags(s: Site) -> list[str]:
    tags = [f"spelling={s.spelling}", f"gqa={s.gqa}", f"scale={s.scale}", f"softmax={s.softmax}", f"pv={s.pv}"]
    if s.mask:
        tags += [f"mask={s.mask.how}:{s.mask.fill}:{s.mask.shape}:{s.mask.build}"]
        tags += ["full_row"] if s.mask.full_row else []
    tags += [f"causal={s.causal}"] if s.causal != "none" else []
    tags += [f"sink={s.sink}"] if s.sink != "none" else []
    tags += [t for t, on in (("softcap", s.softcap), ("dropout", s.dropout), ("weights", s.return_weights)) if on]
    tags += [f"flat_decoy={s.flat_decoy}"] if s.flat_decoy else []
    tags += [f"bmm_out={s.bmm_out}"] if s.bmm_out != "bnsd" else []
    return tags


def _site_signature(s: Site) -> str:
    parts = [s.spelling]
    if s.mask:
        parts.append(f"{s.mask.how}({s.mask.fill}{', full row' if s.mask.full_row else ''})")
    parts += [x for x in (s.flat_decoy and f"flat {s.flat_decoy}", s.bmm_out != "bnsd" and "bmm out nbsd",
                          s.pv == "v_float" and "v.float()") if x]
    return " ".join(parts)


def render_attention(p: AttentionProgram) -> Program:
    b = Builder()
    q, k, v = _site_inputs(b, p.dims, p.layout, p.site.flat_decoy)
    out, weights = render_site(b, p.site, p.dims, q, k, v)
    b.outputs = [_out_layout(b, out, p.out_layout)] + ([weights] if weights else [])
    expected = {"attention": int(p.site.attention_shaped), "kv_update": 0}
    tags = (f"dtype={p.dtype}", f"layout={p.layout}", f"out={p.out_layout}", *(["dynamic"] if p.dynamic else []),
            "decode" if p.dims.sq == 1 else "prefill", *_site_tags(p.site))
    src = _module_source(b, family=p.family, dtype=p.dtype, dynamic=p.dynamic, expected=expected, seed=p.seed,
                         tags=tags)
    return Program(p.family, p, src, expected, tags, _site_signature(p.site))


def render_stacked(p: StackedProgram) -> Program:
    b = Builder()
    q1, k1, v1 = _site_inputs(b, p.dims1, "bnsd", "", "1")
    out1, w1 = render_site(b, p.site1, p.dims1, q1, k1, v1, "1")
    d2 = p.dims2
    if p.chain == "query":
        b.line(f"q2 = {out1}")
        k2 = b.step_input("k2", f"k2 = randn{_tuple(_bnsd(d2, 'k'))}")
        v2 = b.step_input("v2", f"v2 = randn{_tuple(_bnsd(d2, 'v'))}")
    elif p.chain == "value":
        b.step_input("q2", f"q2 = randn{_tuple(_bnsd(d2, 'q'))}")
        k2 = b.step_input("k2", f"k2 = randn{_tuple(_bnsd(d2, 'k'))}")
        v2 = out1
    elif p.chain == "kv":
        b.step_input("q2", f"q2 = randn{_tuple(_bnsd(d2, 'q'))}")
        k2 = v2 = out1
    elif p.chain == "shared_kv":
        b.step_input("q2", f"q2 = randn{_tuple(_bnsd(d2, 'q'))}")
        k2, v2 = k1, v1
    else:
        _, k2, v2 = _site_inputs(b, d2, "bnsd", "", "2")
    out2, w2 = render_site(b, p.site2, d2, "q2", k2, v2, "2")
    b.outputs = ([out1] if p.chain in ("independent", "shared_kv") else []) + [out2] + [w for w in (w1, w2) if w]
    expected = {"attention": int(p.site1.attention_shaped) + int(p.site2.attention_shaped), "kv_update": 0}
    tags = (f"dtype={p.dtype}", f"chain={p.chain}", *(["dynamic"] if p.dynamic else []),
            *[f"site1:{t}" for t in _site_tags(p.site1)], *[f"site2:{t}" for t in _site_tags(p.site2)])
    src = _module_source(b, family="stacked", dtype=p.dtype, dynamic=p.dynamic, expected=expected, seed=p.seed,
                         tags=tags)
    return Program("stacked", p, src, expected, tags,
                   f"{p.chain}: {_site_signature(p.site1)} -> {_site_signature(p.site2)}")


KV_WRITES_INPLACE = ("index_copy_", "index_put_", "slice", "neg_slice")
KV_WRITES_OUT_OF_PLACE = ("index_copy", "slice_scatter", "clone_index_copy_", "clone_index_put_")
KV_WRITES = KV_WRITES_INPLACE + KV_WRITES_OUT_OF_PLACE
# How positions are computed (tensor positions for index writes; a python int start for slices).
TENSOR_POSITIONS = ("arange+tensor", "arange+int", "arange(start,end)", "add_alpha", "arange+vector", "input",
                    "single")


def _kv_needed_length(p: KvProgram) -> int:
    last_start = p.start0 + (p.steps - 1) * p.s
    if p.positions == "add_alpha":
        return 2 * last_start + p.s
    if p.positions in ("arange+vector", "none"):
        return p.s
    return last_start + p.s


def render_kv(p: KvProgram) -> Program:
    b = Builder()
    dims = Dims(p.b, p.nq, p.nkv, p.s, p.length, p.d, p.d)
    b.step_input("q", f"q = randn{_tuple(_bnsd(dims, 'q'))}")
    new = (p.b, p.nkv, p.s, p.d)
    b.step_input("k", f"k = randn{_tuple(new)}")
    b.step_input("v", f"v = randn{_tuple(new)}")
    for c in ("k_cache", "v_cache"):
        b.fixed_input(c, f"{c} = randn{_tuple((p.b, p.nkv, p.length, p.d))}")
        if p.holder == "buffers":
            b.buffers.append(c)
    start = f"{p.start0} + step * {p.s}" if p.steps > 1 else str(p.start0)
    if p.positions in ("arange+tensor", "add_alpha", "single"):
        b.step_input("start", f"start = torch.tensor({start})")
    elif p.positions in ("arange+int", "arange(start,end)", "int"):
        b.step_input("start", f"start = {start}")
    elif p.positions == "arange+vector":  # distinct but not contiguous positions (a decoy)
        b.step_input("offsets", f"offsets = torch.randperm({p.length}, generator=g)[:{p.s}] - torch.arange({p.s})")
    elif p.positions == "input":  # positions computed by the caller, like transformers' cache_position
        b.step_input("pos", f"pos = torch.arange({p.s}) + ({start})")
    if p.read_before != "none":  # a view (sees the write) or a copy (does not) of the cache before the write
        b.line("old = k_cache[:, :, :2]" + (".clone()" if p.read_before == "clone" else ""))
    b.line(*{
        "arange+tensor": ["pos = torch.arange(k.shape[2]) + start"],
        "arange+int": ["pos = torch.arange(k.shape[2]) + start"],
        "arange(start,end)": ["pos = torch.arange(start, start + k.shape[2])"],
        "add_alpha": ["pos = torch.add(torch.arange(k.shape[2]), start, alpha=2)  # arange + 2 * start"],
        "arange+vector": ["pos = torch.arange(k.shape[2]) + offsets"],
        "single": ["pos = start.view(1)"],
    }.get(p.positions, []))
    caches = ("k_cache", "v_cache")
    if p.write in KV_WRITES_OUT_OF_PLACE:
        caches = ("k_all", "v_all")
    for x, cache, result in (("k", "k_cache", caches[0]), ("v", "v_cache", caches[1])):
        b.line(*{
            "index_copy_": [f"{cache}.index_copy_(2, pos, {x})"],
            "index_put_": [f"{cache}[:, :, pos] = {x}"],
            "slice": [f"{cache}[:, :, start:start + {x}.shape[2]] = {x}"],
            "neg_slice": [f"{cache}[:, :, -{x}.shape[2]:] = {x}"],
            "index_copy": [f"{result} = {cache}.index_copy(2, pos, {x})  # out of place"],
            "slice_scatter": [f"{result} = torch.slice_scatter({cache}, {x}, dim=2, start=start, "
                              f"end=start + {x}.shape[2])  # out of place"],
            "clone_index_copy_": [f"{result} = {cache}.clone()", f"{result}.index_copy_(2, pos, {x})"],
            "clone_index_put_": [f"{result} = {cache}.clone()", f"{result}[:, :, pos] = {x}"],
        }[p.write])
    outputs = []
    if p.read is not None:
        out, weights = render_site(b, p.read, dims, "q", caches[0], caches[1])
        outputs += [out] + ([weights] if weights else [])
    elif p.write in KV_WRITES_OUT_OF_PLACE:
        outputs += list(caches)
    if p.read_before != "none":
        outputs.append("old * 2")
    b.outputs = outputs
    expected = {"attention": int(p.read is not None and p.read.attention_shaped),
                "kv_update": 2 if p.write in KV_WRITES_INPLACE else 0}
    tags = (f"dtype={p.dtype}", f"holder={p.holder}", f"write={p.write}", f"positions={p.positions}",
            f"read_before={p.read_before}", f"steps={p.steps}", *(["dynamic"] if p.dynamic else []),
            "decode" if p.s == 1 else "prefill", *(_site_tags(p.read) if p.read else ["read=none"]))
    src = _module_source(b, family="kv", dtype=p.dtype, dynamic=p.dynamic, expected=expected, seed=p.seed, tags=tags,
                         steps=p.steps, holder=p.holder)
    return Program("kv", p, src, expected, tags, f"{p.write} at {p.positions}" + (" dynamic" if p.dynamic else ""))


def render_paged(p: PagedProgram) -> Program:
    b = Builder()
    b.step_input("key", f"key = randn({p.tokens}, {p.heads}, {p.d})")
    b.step_input("value", f"value = randn({p.tokens}, {p.heads}, {p.d})")
    cache_shape = ((p.blocks, p.block_size, p.heads, p.d) if p.cache_layout == "bsnd"
                   else (p.blocks, p.block_size, p.heads * p.d))
    for c in ("key_cache", "value_cache"):
        b.fixed_input(c, f"{c} = randn{_tuple(cache_shape)}")
        if p.holder == "buffers":
            b.buffers.append(c)
    cast = "" if p.slot_dtype == "int64" else ".to(torch.int32)"
    b.step_input("slots", f"slots = torch.randperm({p.blocks * p.block_size}, generator=g)[:{p.tokens}]{cast}"
                          "  # distinct slots, none padding (< 0)")
    b.line("n, d = key.shape[1], key.shape[2]")
    for new, cache, how in (("key", "key_cache", p.key_write), ("value", "value_cache", p.value_write)):
        b.line({"index_put": f"{cache}.view(-1, n, d)[slots] = {new}",
                "index_copy_": f"{cache}.view(-1, n, d).index_copy_(0, slots, {new})",
                "rows_index_copy_": f"{cache}.view(-1, n * d).index_copy_(0, slots, {new}.reshape(-1, n * d))",
                "block_offset": f"{cache}[slots // {p.block_size}, slots % {p.block_size}] = "
                                f"{new}{'' if p.cache_layout == 'bsnd' else '.reshape(-1, n * d)'}"}[how])
    if p.read != "none":
        b.fixed_input("block_table", f"block_table = torch.randperm({p.blocks}, generator=g)[:{max(1, p.blocks - 1)}]")
    if p.read == "gather":
        b.outputs = ["key_cache[block_table]", "value_cache[block_table]"]
    elif p.read == "attention":
        b.step_input("query", f"query = randn(1, {p.heads}, 1, {p.d})")
        b.line("keys = key_cache[block_table].reshape(-1, n, d).transpose(0, 1)[None]",
               "values = value_cache[block_table].reshape(-1, n, d).transpose(0, 1)[None]",
               "out = F.scaled_dot_product_attention(query, keys, values)")
        b.outputs = ["out"]
    expected = {"attention": int(p.read == "attention"), "kv_update": 2}
    tags = (f"dtype={p.dtype}", f"holder={p.holder}", f"cache={p.cache_layout}", f"key_write={p.key_write}",
            f"value_write={p.value_write}", f"slots={p.slot_dtype}", f"read={p.read}", f"steps={p.steps}",
            *(["dynamic"] if p.dynamic else []))
    src = _module_source(b, family="paged", dtype=p.dtype, dynamic=p.dynamic, expected=expected, seed=p.seed, tags=tags,
                         steps=p.steps, holder=p.holder)
    return Program("paged", p, src, expected, tags, f"{p.cache_layout} cache, {p.key_write}/{p.value_write}")


def _router_matches(p: RouterProgram) -> bool:
    """Whether the router rule must list this program's site (matched: fused, or left alone with a reason)."""
    if p.topk_dim == "first" or not p.largest or not p.sorted or p.softmax_dim == "first":
        return False
    if p.order == "topk_softmax":
        # softmax(top, dtype=float32) on half logits is a cast before the softmax: not the op's form.
        return not (p.upcast == "softmax_dtype" and p.dtype != "float32")
    return True


def render_router(p: RouterProgram) -> Program:
    b = Builder()
    lead = {"ts": (7,), "bsh": (2, 3), "bs2h": (2, 3, 2)}[p.shape]
    hidden = 16
    b.step_input("x", f"x = randn{_tuple(lead + (hidden,))}")
    b.fixed_input("weight", f"weight = randn({p.experts}, {hidden}, scale=0.5)")
    if p.bias:
        b.fixed_input("bias", f"bias = randn({p.experts}, scale=0.5)")
    b.line(f"logits = F.linear(x, weight{', bias' if p.bias else ''})")
    if p.upcast == "float":
        b.line("logits = logits.float()")
    rank = len(lead) + 1
    topk_dim = {"last": -1, "positive": rank - 1, "first": 0}[p.topk_dim]
    softmax_dim = {"last": -1, "first": 0}[p.softmax_dim]
    dtype_kw = ", dtype=torch.float32" if p.upcast == "softmax_dtype" else ""

    def softmax(t: str) -> str:
        if p.softmax == "method" and not dtype_kw:
            return f"{t}.softmax({softmax_dim})"
        fn = "F.softmax" if p.softmax == "F" else "torch.softmax"
        return f"{fn}({t}, dim={softmax_dim}{dtype_kw})"

    topk = f"k={p.k}, dim={topk_dim}, largest={p.largest}, sorted={p.sorted}"
    if p.order == "topk_softmax":
        b.line(f"top, ids = torch.topk(logits, {topk})", f"weights = {softmax('top')}")
    else:
        b.line(f"probs = {softmax('logits')}", f"top, ids = torch.topk(probs, {topk})")
        b.line("weights = top / top.sum(-1, keepdim=True)" if p.renormalise else "weights = top")
    b.outputs = ["weights", "ids"] + {"none": [], "probs": ["probs"], "top": ["top"]}[p.extra]
    expected = {"attention": 0, "kv_update": 0, "moe": int(_router_matches(p))}
    tags = (f"dtype={p.dtype}", f"x={p.shape}", f"E={p.experts}", f"k={p.k}", f"order={p.order}",
            f"upcast={p.upcast}", f"softmax={p.softmax}", *(["renormalise"] if p.renormalise else []),
            f"topk_dim={p.topk_dim}", *([] if p.largest else ["smallest"]), *([] if p.sorted else ["unsorted"]),
            f"softmax_dim={p.softmax_dim}", f"extra={p.extra}", *(["bias"] if p.bias else []),
            *(["dynamic"] if p.dynamic else []))
    src = _module_source(b, family="router", dtype=p.dtype, dynamic=p.dynamic, expected=expected, seed=p.seed,
                         tags=tags)
    return Program("router", p, src, expected, tags, f"{p.order} {p.dtype} upcast={p.upcast}")


# ----------------------------------------------------------------------------------------------------------------
# Strategies. sampled_from shrinks towards its first element, so every list starts with the plainest choice.


def rare(p_true: int = 4) -> st.SearchStrategy[bool]:
    """True about once in p_true draws (shrinks to False)."""
    return st.sampled_from([False] * (p_true - 1) + [True])


dtypes = st.sampled_from(DTYPES)
seeds = st.integers(0, 2**16)
# About a third of the draws keep everything but one or two features plain (layouts, scale, softmax spelling,
# head dims the fused ops take), so the backend rewrites the program and the risky feature (a mask, a GQA form,
# a dtype) goes through the rewrite; the others draw every feature. (Shrinks towards plain.)
plain = st.sampled_from([True, False, False])


@st.composite
def dims_st(draw: st.DrawFn, ratios: tuple[int, ...] = (1, 2, 4)) -> Dims:
    if draw(plain):  # shapes the fused ops take
        nkv, sq = draw(st.sampled_from([1, 2])), draw(st.sampled_from([2, 1, 3, 5]))
        d = draw(st.sampled_from([16, 32, 64]))
        return Dims(b=draw(st.sampled_from([1, 2])), nq=nkv * draw(st.sampled_from(ratios)), nkv=nkv, sq=sq,
                    skv=sq + draw(st.sampled_from([0, 3])), d=d, dv=d)
    nkv = draw(st.sampled_from([1, 2]))
    ratio = draw(st.sampled_from(ratios))
    sq = draw(st.sampled_from([2, 1, 3, 5, 8]))  # 1: a decode step
    skv = max(1, sq + draw(st.sampled_from([0, 3, 1, 6, -1])))  # S_kv < S_q too (a 1-key context)
    d = draw(st.sampled_from([16, 32, 64, 16, 32, 64, 24, 40]))  # 24, 40: not multiples of 16 (never fused)
    dv = draw(st.sampled_from([16, 32, 24])) if draw(rare(4)) else d  # D_v != D in a quarter
    return Dims(b=draw(st.sampled_from([1, 2, 3])), nq=nkv * ratio, nkv=nkv, sq=sq, skv=skv, d=d, dv=dv)


@st.composite
def sdpa_mask_st(draw: st.DrawFn) -> Mask:
    how = draw(st.sampled_from(["sdpa_bool", "sdpa_float"]))
    fill = "-inf" if how == "sdpa_bool" else draw(st.sampled_from(["-inf", "min", "bias"]))
    return _mask(draw, how, fill)


@st.composite
def hand_mask_st(draw: st.DrawFn) -> Mask:
    how = draw(st.sampled_from(["masked_fill", "add_float", "where", "add_bool"]))
    fills = {"add_float": ["-inf", "min", "bias"], "add_bool": ["bool"]}.get(how, ["-inf", "min"])
    return _mask(draw, how, draw(st.sampled_from(fills)))


def _mask(draw: st.DrawFn, how: str, fill: str) -> Mask:
    shape = draw(st.sampled_from(MASK_SHAPES))
    build = draw(st.sampled_from(["input", "where", "fill"])) if how in ("sdpa_float", "add_float") else "input"
    full_row = False if fill in ("bias", "bool") or shape == "111k" else draw(rare())
    return Mask(how=how, fill=fill, shape=shape, build=build, full_row=full_row)


def _gqa_st(ratio: int, sdpa: bool) -> st.SearchStrategy[str]:
    forms = ["repeat_kv", "repeat_interleave", "expand"] + (["enable_gqa"] if sdpa else [])
    return st.sampled_from((["none"] if ratio == 1 else []) + forms)


@st.composite
def sdpa_site_st(draw: st.DrawFn, dims: Dims, allow_mask: bool = True) -> Site:
    gqa = draw(_gqa_st(dims.ratio, sdpa=True))
    extra = draw(st.sampled_from(["none", "mask", "is_causal"] if allow_mask else ["none", "is_causal"]))
    return Site(spelling="sdpa", gqa=gqa,
                scale=draw(st.sampled_from(["default", "custom"])),
                scale_value=draw(st.sampled_from([0.125, 0.3, 1.0, 0.05])),
                mask=draw(sdpa_mask_st()) if extra == "mask" else None,
                causal="is_causal" if extra == "is_causal" else "none",
                explicit_dropout_p=draw(st.booleans()))


# (softmax, pv) pairs that are valid in any dtype; v_float / upcast_keep make a float32 output in half models.
# Repeats weight the draw: decoys and the float32-output forms are rarer than the common spellings.
SOFTMAX_PV = [("method", "matmul"), ("F", "matmul"), ("upcast_back", "matmul"), ("method", "matmul"),
              ("F", "matmul"), ("upcast_back", "matmul"), ("upcast_float", "matmul"), ("method", "to_v"),
              ("upcast_keep", "to_v"), ("upcast_keep", "v_float"), ("decoy_dim", "matmul"), ("decoy_log", "matmul")]


@st.composite
def hand_site_st(draw: st.DrawFn, dims: Dims, allow_decoys: bool = True, same_dtype_out: bool = False) -> Site:
    if draw(plain):  # the common spelling, so the backend rewrites it, with one risky feature: the mask
        return Site(spelling=draw(st.sampled_from(["at", "matmul", "bmm"])), gqa="none" if dims.ratio == 1 else
                    "repeat_kv", scale="div", scale_value=round(dims.d ** -0.5, 6),
                    mask=draw(st.none() | hand_mask_st()))
    spelling = draw(st.sampled_from(["at", "matmul", "bmm", "at", "matmul", "bmm", "einsum"]))
    pairs = [sp for sp in SOFTMAX_PV if allow_decoys or not sp[0].startswith("decoy")]
    if same_dtype_out:  # the output feeds another site: a hard-coded float32 would not follow the fp64 evaluation
        pairs = [sp for sp in pairs if sp[1] != "v_float"]
    softmax, pv = draw(st.sampled_from(pairs))
    causal = draw(st.sampled_from(["none", "none", "tril_tl", "tril_br"]))
    return Site(spelling=spelling, gqa=draw(_gqa_st(dims.ratio, sdpa=False)),
                scale=draw(st.sampled_from(["div", "mul", "div_size", "q", "div", "mul", "div_size", "q", "k", "none",
                                            "tensor", "pyfloat"])),
                scale_value=draw(st.sampled_from([round(dims.d ** -0.5, 6), 0.1, 0.3])),
                mask=draw(hand_mask_st()) if draw(st.sampled_from([True, True, False])) else None,
                causal=causal, causal_fill=draw(st.sampled_from(["-inf", "min"])),
                softmax=softmax, pv=pv, softcap=draw(rare(10)),
                sink=draw(st.sampled_from(["per_head", "per_head_max", "per_row"])) if draw(rare(6)) else "none",
                dropout=draw(rare(6)),
                return_weights=draw(rare(8)) if allow_decoys else False)


@st.composite
def sdpa_programs(draw: st.DrawFn) -> Program:
    dims = draw(dims_st())
    site = draw(sdpa_site_st(dims))
    if draw(plain):
        return render_attention(AttentionProgram("sdpa", draw(dtypes), False, dims, site, "bnsd", "bnsd",
                                                 draw(seeds)))
    return render_attention(AttentionProgram(
        family="sdpa", dtype=draw(dtypes), dynamic=draw(rare(6)), dims=dims, site=site,
        layout=draw(st.sampled_from(["bnsd", "bsnd", "proj"])), out_layout=draw(st.sampled_from(["bnsd", "bsh",
                                                                                                   "nbsd"])),
        seed=draw(seeds)))


@st.composite
def eager_programs(draw: st.DrawFn) -> Program:
    dims = draw(dims_st())
    dtype = draw(dtypes)
    site = draw(hand_site_st(dims))
    layout = draw(st.sampled_from(["bnsd", "bsnd", "proj"]))
    if site.spelling == "bmm" and dims.ratio == 1 and site.gqa == "none" and layout != "proj" and draw(rare(4)):
        site = replace(site, flat_decoy=draw(st.sampled_from(["q", "v"])))  # dims relabelled by a flattening
    if site.spelling == "bmm" and draw(rare(6)):
        site = replace(site, bmm_out="nbsd")
    if draw(plain):
        return render_attention(AttentionProgram("eager", dtype, False, dims, site, "bnsd", "bnsd", draw(seeds)))
    return render_attention(AttentionProgram(
        family="eager", dtype=dtype, dynamic=draw(rare(6)), dims=dims, site=site, layout=layout,
        out_layout=draw(st.sampled_from(["bnsd", "bsh", "nbsd"])), seed=draw(seeds)))


@st.composite
def any_site_st(draw: st.DrawFn, dims: Dims, allow_mask: bool = True) -> Site:
    """An SDPA or hand-written site whose output has the inputs' dtype (it feeds more code)."""
    if draw(st.booleans()):
        return draw(sdpa_site_st(dims, allow_mask))
    site = draw(hand_site_st(dims, allow_decoys=False, same_dtype_out=True))
    return site if allow_mask else replace(site, mask=None)


@st.composite
def stacked_programs(draw: st.DrawFn) -> Program:
    dtype = draw(dtypes)
    chain = draw(st.sampled_from(["query", "value", "kv", "independent", "shared_kv"]))
    d1 = draw(dims_st(ratios=(1, 2)))
    r2 = draw(st.sampled_from([1, 2]))
    other = draw(dims_st(ratios=(1, 2)))
    if chain == "query":  # q2 = out1: (B, N_q1, S_q1, D_v1)
        nkv2 = d1.nq // r2 if d1.nq % r2 == 0 else d1.nq
        d2 = Dims(d1.b, d1.nq, nkv2, d1.sq, other.skv, d1.dv, other.dv)
    elif chain == "value":  # v2 = out1: N_kv2 = N_q1, S_kv2 = S_q1
        d2 = Dims(d1.b, d1.nq * r2, d1.nq, other.sq, d1.sq, other.d, d1.dv)
    elif chain == "kv":
        d2 = Dims(d1.b, d1.nq * r2, d1.nq, other.sq, d1.sq, d1.dv, d1.dv)
    elif chain == "shared_kv":
        d2 = Dims(d1.b, d1.nq, d1.nkv, other.sq, d1.skv, d1.d, d1.dv)
    else:
        d2 = other
    site1 = draw(any_site_st(d1))
    if chain in ("query", "value", "kv"):
        site1 = _finite_rows(site1, d1)
    return render_stacked(StackedProgram(
        dtype=dtype, dynamic=draw(rare(8)), chain=chain, dims1=d1, site1=site1,
        dims2=d2, site2=draw(any_site_st(d2)), seed=draw(seeds)))


def _finite_rows(site: Site, dims: Dims) -> Site:
    """The site without query rows that an -inf mask leaves with no key. Eager
    softmax makes such rows NaN (the rewrite keeps that), and what a later
    attention makes of NaN inputs is up to torch's kernel: its CPU SDPA turns a
    NaN query row into 0, a GPU or NPU kernel into NaN."""
    if site.spelling == "sdpa":
        return site
    if site.mask is not None and site.mask.fill == "-inf" and site.mask.full_row:
        site = replace(site, mask=replace(site.mask, full_row=False))
    if site.causal == "tril_br" and site.causal_fill == "-inf" and dims.sq > dims.skv:
        site = replace(site, causal_fill="min")
    return site


@st.composite
def kv_programs(draw: st.DrawFn) -> Program:
    b, nkv = draw(st.sampled_from([1, 2])), draw(st.sampled_from([2, 1]))
    nq = nkv * draw(st.sampled_from([1, 2]))
    s = draw(st.sampled_from([1, 2, 3]))
    d = draw(st.sampled_from([16, 32, 24]))
    write = draw(st.sampled_from(KV_WRITES))
    if write in ("slice", "slice_scatter"):
        positions = "int"
    elif write == "neg_slice":
        positions = "none"
    else:
        positions = draw(st.sampled_from([p for p in TENSOR_POSITIONS if p != "single" or s == 1]))
    steps = draw(st.sampled_from([2, 1, 3]))
    start0 = draw(st.sampled_from([0, 1, 2, 5]))
    p = KvProgram(dtype=draw(dtypes), dynamic=draw(rare(6)), holder=draw(st.sampled_from(["args", "buffers"])),
                  b=b, nkv=nkv, nq=nq, s=s, d=d, length=0, write=write, positions=positions, steps=steps,
                  start0=start0, read_before=draw(st.sampled_from(["none", "none", "view", "clone"])), read=None,
                  seed=draw(seeds))
    length = max(2, _kv_needed_length(p)) + draw(st.sampled_from([0, 1, 3]))
    read_dims = Dims(b, nq, nkv, s, length, d, d)
    read = None
    if draw(st.sampled_from([True, True, False])):
        read = draw(any_site_st(read_dims, allow_mask=False))
    return render_kv(replace(p, length=length, read=read))


@st.composite
def paged_programs(draw: st.DrawFn) -> Program:
    writes = ["index_put", "index_copy_", "rows_index_copy_", "block_offset"]
    key_write, value_write = draw(st.sampled_from(writes)), draw(st.sampled_from(writes))
    # index_copy_ takes int64 indices only
    int64_only = bool({"index_copy_", "rows_index_copy_"} & {key_write, value_write})
    blocks, block_size = draw(st.sampled_from([3, 2, 6])), draw(st.sampled_from([4, 8, 16]))
    return render_paged(PagedProgram(
        dtype=draw(dtypes), dynamic=draw(rare(6)), holder=draw(st.sampled_from(["args", "buffers"])),
        blocks=blocks, block_size=block_size, heads=draw(st.sampled_from([2, 1])),
        d=draw(st.sampled_from([16, 32])), tokens=draw(st.sampled_from([1, 3, 5])),
        cache_layout=draw(st.sampled_from(["bsnd", "bsh"])), key_write=key_write, value_write=value_write,
        slot_dtype="int64" if int64_only else draw(st.sampled_from(["int64", "int32"])),
        steps=draw(st.sampled_from([2, 1, 3])), read=draw(st.sampled_from(["attention", "none", "gather"])),
        seed=draw(seeds)))


@st.composite
def router_programs(draw: st.DrawFn) -> Program:
    experts = draw(st.sampled_from([8, 4, 16, 3]))
    order = draw(st.sampled_from(["topk_softmax", "softmax_topk"]))
    decoys = draw(rare(3))
    return render_router(RouterProgram(
        dtype=draw(dtypes), dynamic=draw(rare(6)), shape=draw(st.sampled_from(["ts", "bsh", "bs2h"])),
        experts=experts, k=draw(st.integers(1, experts)), bias=draw(st.booleans()), order=order,
        upcast=draw(st.sampled_from(["none", "float", "softmax_dtype"])),
        softmax=draw(st.sampled_from(["torch", "F", "method"])),
        renormalise=order == "softmax_topk" and draw(st.booleans()),
        topk_dim=draw(st.sampled_from(["last", "positive"] + (["first"] if decoys else []))),
        largest=not (decoys and draw(st.booleans())), sorted=not (decoys and draw(st.booleans())),
        softmax_dim=draw(st.sampled_from(["last"] + (["first"] if decoys else []))),
        extra=draw(st.sampled_from(["none", "probs" if order == "softmax_topk" else "top"])), seed=draw(seeds)))


FAMILIES: dict[str, Callable[[], st.SearchStrategy[Program]]] = {
    "sdpa": sdpa_programs, "eager": eager_programs, "kv": kv_programs, "paged": paged_programs,
    "stacked": stacked_programs, "router": router_programs,
}


def any_program() -> st.SearchStrategy[Program]:
    return st.one_of(*(make() for make in FAMILIES.values()))


# ----------------------------------------------------------------------------------------------------------------
# Known defect classes (the reproductions in the shared repros folder) as program descriptions: tests/test_fuzz.py
# runs each as its own test, so every class is checked in each run whatever the random draws are.


def _hand(**kw: object) -> Site:  # plain hand-written attention, with overrides
    return Site(**{"spelling": "at", "gqa": "none", "scale": "div", "scale_value": 0.25, **kw})


def _sdpa(**kw: object) -> Site:
    return Site(**{"spelling": "sdpa", "gqa": "none", "scale": "default", "scale_value": 0.125, **kw})


def _attention(family: str, dims: Dims, site: Site, dtype: str = "float32", layout: str = "bnsd",
               out_layout: str = "bnsd", dynamic: bool = False) -> Program:
    return render_attention(AttentionProgram(family, dtype, dynamic, dims, site, layout, out_layout, seed=0))


def _kv(write: str, positions: str, **kw: object) -> Program:
    base = dict(dtype="float32", dynamic=False, holder="args", b=1, nkv=2, nq=2, s=2, d=16, length=10, write=write,
                positions=positions, steps=2, start0=1, read_before="none", read=_sdpa(), seed=0)
    return render_kv(KvProgram(**{**base, **kw}))


def known_defects() -> dict[str, Program]:
    """One program per known defect class, named "family/defect"."""
    return {
        # a (B, 1, 1, S_kv) padding mask broadcast over S_q > 1 (mask_query_broadcast_crash)
        "sdpa/padding-mask-broadcast-over-queries": _attention(
            "sdpa", Dims(2, 4, 4, 5, 7, 32, 32), _sdpa(mask=Mask("sdpa_bool", "-inf", "b11k", "input", False))),
        # where(keep, 0, finfo.min) with a fully masked query row (finfo_min_fully_masked_row)
        "sdpa/finfo-min-fully-masked-row": _attention(
            "sdpa", Dims(1, 2, 2, 4, 6, 16, 16), _sdpa(mask=Mask("sdpa_float", "min", "11qk", "where", True))),
        # an additive bias (pse_shift) with dynamic shapes (dynamic_symint_literal_crash)
        "sdpa/dynamic-bias": _attention(
            "sdpa", Dims(2, 2, 2, 5, 5, 16, 16), _sdpa(mask=Mask("sdpa_float", "bias", "b1qk", "input", False)),
            layout="proj", dynamic=True),
        # scores + bool tensor is a +1.0 bias (bool_mask_added_as_keep)
        "eager/bool-tensor-added": _attention(
            "eager", Dims(2, 4, 4, 5, 7, 32, 32), _hand(mask=Mask("add_bool", "bool", "b1qk", "input", False))),
        # masked_fill(finfo.min) with a fully masked query row (finfo_min_fully_masked_row)
        "eager/finfo-min-fully-masked-row": _attention(
            "eager", Dims(1, 2, 2, 4, 6, 16, 16), _hand(mask=Mask("masked_fill", "min", "11qk", "input", True))),
        # a 3-D mask broadcasts over heads, not batch (mask_3d_heads_vs_batch)
        "eager/3d-mask-per-head": _attention(
            "eager", Dims(2, 2, 2, 4, 6, 16, 16), _hand(mask=Mask("masked_fill", "-inf", "nqk", "input", False))),
        # bmm output relabelled as (N, B, S, D); BSND q / v flattened as BNSD (flattened_operand_shape_not_checked)
        "eager/bmm-output-relabelled": _attention(
            "eager", Dims(1, 4, 4, 3, 5, 16, 16), _hand(spelling="bmm", scale="mul", bmm_out="nbsd")),
        "eager/bsnd-query-flattened-as-bnsd": _attention(
            "eager", Dims(1, 2, 2, 4, 5, 16, 16), _hand(spelling="bmm", scale="mul", flat_decoy="q")),
        "eager/bsnd-value-flattened-as-bnsd": _attention(
            "eager", Dims(1, 2, 2, 1, 5, 16, 16), _hand(spelling="bmm", scale="mul", flat_decoy="v")),
        # BSND inputs + repeat_kv, output relabelled by a reshape: the fused op's output strides break the view
        # AOT recorded for the reshape (found by this fuzzer; not among the shared repros)
        "eager/bsnd-gqa-output-reshaped": _attention(
            "eager", Dims(2, 4, 2, 2, 2, 16, 16), _hand(gqa="repeat_kv"), layout="bsnd", out_layout="nbsd"),
        # float32 probabilities @ v.float() in a float16 model (value_dtype_differs_crash)
        "eager/float32-value-in-half-model": _attention(
            "eager", Dims(1, 2, 2, 4, 4, 16, 16), _hand(softmax="upcast_keep", pv="v_float"), "float16"),
        # D_v != D with one query token (value_head_dim_decode_crash)
        "eager/value-head-dim-decode": _attention("eager", Dims(2, 4, 4, 1, 7, 32, 64), _hand()),
        # einsum attention over a single key (S_kv = 1) is not in the report (found by this fuzzer at 1fbd956)
        "eager/einsum-single-key-listed": _attention("eager", Dims(1, 1, 1, 1, 1, 16, 16), _hand(spelling="einsum")),
        # ... and with a sink column: the softmax has two columns, the product with V one (found by the soak at
        # 2926936)
        "eager/einsum-single-key-with-sink-listed": _attention(
            "eager", Dims(1, 2, 1, 1, 1, 16, 16), _hand(spelling="einsum", sink="per_head")),
        "kv/add-alpha-positions": _kv("index_copy_", "add_alpha", length=20),  # (add_alpha_positions)
        "kv/arange-plus-vector": _kv("index_copy_", "arange+vector"),  # (arange_plus_vector_crash)
        "kv/negative-slice": _kv("neg_slice", "none"),  # cache[:, :, -S:] = k (negative_slice_start_crash)
        # cache.index_copy (out of place) made in place (functional_cache_write_made_inplace)
        "kv/out-of-place-write": _kv("index_copy", "arange+tensor", read_before="view"),
        # a symbolic start position with dynamic shapes (dynamic_symint_literal_crash)
        "kv/dynamic-start": _kv("index_copy_", "arange+int", dynamic=True, s=1, b=2),
        # attention's output is the next attention's query (stacked_attention_stale_site_crash)
        "stacked/sdpa-output-is-next-query": render_stacked(StackedProgram(
            "float32", False, "query", Dims(2, 2, 2, 4, 6, 16, 16), _sdpa(), Dims(2, 2, 2, 4, 6, 16, 16), _sdpa(),
            seed=0)),
        "stacked/eager-output-is-next-query": render_stacked(StackedProgram(
            "float32", False, "query", Dims(2, 2, 2, 4, 6, 16, 16), _hand(), Dims(2, 2, 2, 4, 6, 16, 16), _hand(),
            seed=0)),
    }
