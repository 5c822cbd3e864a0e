"""Training graphs: hand-written attention becomes npu_fusion_attention before AOT.

The inference rule (eager_attention_to_fused, EAGER_RULE) runs after AOT, where a
training step's attention is split into a forward and a backward graph tied by
saved activations (the softmax output): no rewrite of one graph alone is sound.
So when gradients are needed, this pass works on dynamo's graph, before AOT:

1. dynamo's torch-level graph is traced into a pre-dispatch ATen graph
   (make_fx with ``pre_dispatch=True``, the IR torch.export's training IR uses:
   above autograd, so ``torch.no_grad()`` regions stay as ``_set_grad_enabled``
   calls and AOT later differentiates the graph as it would have the original).
   Every CompositeImplicitAutograd op is decomposed while tracing (matmul into
   expand/view/bmm, softmax.int into _softmax, ``.to`` into _to_copy): that is
   what autograd itself does with them, and it gives the attention the same
   ATen form the inference rule reads after AOT. ``aten.dropout`` is kept, so
   its probability and training flag can be read;
2. TRAINING_EAGER_RULE matches each attention there with the inference rule's own
   pattern logic (walk_scores, site_from_chains: every spelling EAGER_RULE
   reads), plus a dropout step between the softmax and the second bmm, and the
   shared mask planning (_masks.plan_mask) decides the mask and bias terms;
3. a matched site becomes npu_fusion_attention (BNSD). Its torch.library
   autograd formula makes AOT put npu_fusion_attention in the forward graph and
   npu_fusion_attention_grad in the backward graph;
4. dynamo's graph is replaced by the rewritten ATen graph (placeholders keep
   dynamo's names and metadata), which AOT autograd then takes as usual.
   Where nothing is rewritten, dynamo's graph is left exactly as it was.

What the fused op computes differs from the program in places the rewrite
must make equal, forward and backward:

- npu_fusion_attention adds pse *before* scaling (``scale * (q k^T + pse)``);
  the program adds its bias after. With a bias the scale is folded into the
  query (``(scale * q) k^T + pse``, op scale 1) rather than dividing the bias by
  the scale, which would overflow a ``finfo.min`` inside it to -inf;
- a row whose every key a ``finfo.min`` mask removes is uniform in eager (the
  minimum absorbs the scores): output mean(V). The op gives 0 there. Where
  the mask is *added* (transformers' form), eager's gradient also reaches q and
  k through the softmax's Jacobian at the uniform point; where it is a *fill*
  (masked_fill, where) the fill's backward zeroes it. The training fix-up gives
  such rows ``mean(V)``, plus ``X - X.detach()`` for an added mask, with
  ``X = scale/S_kv * q @ (k^T @ (V - mean V).detach())``: value mean(V), and
  exactly eager's gradients to q, k and V (see _uniform_rows), at
  O(S * D * D_v) per head, not O(S^2);
- a row whose every key a ``-inf`` mask removes is NaN in eager (aten softmax),
  and so are the gradients of every value of its (batch, head), and for an
  added mask also of its query and every key. The fix-up reproduces exactly
  that (_nan_rows). Added and filled masks together, or a bias with a mask that
  may empty a row, would need eager's order of the terms: left alone, reason given;
- a mask the shared planning proves to be a band (built from positions)
  becomes the op's sparse mode 2/3/4 with the compressed mask; a scale the graph
  reads at run time (dynamic=True makes Python floats inputs; the trace reads
  them back as SymFloats, turned into 0-d tensor factors by tensor_scalars) is
  folded into the query;
- dropout > 0 in training is left alone: npu_fusion_attention's dropout masks
  come from its own RNG (seed/offset), so the result could never equal eager's;
- sites inside torch.autocast (a region in the graph, or autocast enabled when
  the backend runs) are left alone: the program's matmuls run in autocast's
  dtype, and a custom op is not cast.

Every matched site is in the report (graph "training"), fused or with its reason;
the softmax of a site left alone is marked (custom meta, which AOT copies) so the
post-AOT passes do not list it again (claim_sites_left_in_training). If the trace
fails, dynamo's graph is left as it was and the post-AOT passes see the sites.
"""

from __future__ import annotations

import functools
import math
import operator

import torch
import torch.fx.traceback as fx_traceback
from torch.fx.experimental.proxy_tensor import make_fx

from .._logging import log
from ..report import Report, Site
from ._attention import AttentionSite, causal_mask_node, fold_runtime_scales, site_scale, structure_reason
from ._context import PassContext
from ._fx import CLAIMED, Rewrite, RewriteRefused, is_call, same_shape, same_strides, static_int, val
from ._masks import _empty_rows, plan_mask
from ._rules import Rule, RuleStats, apply_rules
from .eager_attention_to_fused import CASTS, SOFTMAXES, keeps_element_order, site_from_chains, walk_scores
from .training_packed_to_tnd import SITE_ID, mark_site

aten = torch.ops.aten
npu_attn = torch.ops.npu_attn

PATTERN = "eager(training):matmul-softmax-matmul"


# ----------------------------------------------------------------------------
# dynamo's graph -> a pre-dispatch ATen graph
# ----------------------------------------------------------------------------


@functools.cache
def composite_implicit_decompositions() -> dict:
    """Every CompositeImplicitAutograd op -> its own CIA kernel, except aten.dropout
    (kept whole, so the rule can read p and train)."""
    table = {}
    for name in torch._C._dispatch_get_registrations_for_dispatch_key("CompositeImplicitAutograd"):
        namespace, _, rest = name.partition("::")
        op_name, _, overload = rest.partition(".")
        try:
            op = getattr(getattr(getattr(torch.ops, namespace), op_name), overload or "default")
        except (AttributeError, RuntimeError):
            continue
        if isinstance(op, torch._ops.OpOverload) and op is not aten.dropout.default:
            table[op] = op.decompose
    return table


def _may_hold_attention(gm: torch.fx.GraphModule) -> bool:
    """A softmax call anywhere in dynamo's graph (F.softmax, torch.softmax, x.softmax,
    nn.Softmax inlined): only then is the graph traced again."""
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_method"):
            name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
            if "softmax" in str(name) and "log_softmax" not in str(name):
                return True
    return False


# node.meta["custom"] keys ("custom" is the node metadata that tracing copies onto every
# node made from a node, through this pass's trace and through AOT's):
SOURCE = "npu_attn_dynamo_node"  # on the traced nodes while this pass runs: the dynamo node's name
LEFT_IN_TRAINING = "npu_attn_left_in_training"  # a softmax this pass (or an SDPA call the SDPA pass) left alone
SDPA_ROW = "npu_attn_sdpa_row"  # on a fused call: id() of the SDPA row it replaces (_one_row_per_call)


def pre_dispatch_graph(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """dynamo's graph traced into a pre-dispatch ATen graph, on dynamo's own fake
    values (the placeholders' example_value: same fake mode and symbols). Each
    traced node's custom[SOURCE] names the dynamo node it came from."""
    values = [node.meta["example_value"] for node in gm.graph.find_nodes(op="placeholder")]
    fake_mode = next(v.fake_mode for v in values if isinstance(v, torch._subclasses.FakeTensor))

    def run(*args):
        return torch.fx.Interpreter(gm).run(*args)

    saved = {node: node.meta.get("custom") for node in gm.graph.nodes}
    for node in gm.graph.nodes:
        node.meta["custom"] = {**(saved[node] or {}), SOURCE: node.name}
    try:
        # Through an Interpreter with preserve_node_meta, each ATen node keeps its source
        # node's stack_trace, nn_module_stack and custom meta (the report's layer and file:line).
        with fake_mode, fx_traceback.preserve_node_meta():
            return make_fx(run, pre_dispatch=True, decomposition_table=composite_implicit_decompositions())(*values)
    finally:
        for node, custom in saved.items():
            if custom is None:
                node.meta.pop("custom", None)
            else:
                node.meta["custom"] = custom


def _mark_left_alone(gm: torch.fx.GraphModule, traced: torch.fx.GraphModule, installed: bool) -> None:
    """Mark the softmax of every site this pass left alone (on the graph AOT will take)
    so that the post-AOT passes do not list it a second time (claim_sites_left_in_training)."""
    by_name = {node.name: node for node in gm.graph.nodes}
    for node in traced.graph.nodes:
        custom = node.meta.get("custom") or {}
        target = node if installed else by_name.get(custom.get(SOURCE))
        if CLAIMED in node.meta and target is not None:
            mark_left_in_training(target)
        if installed and SOURCE in custom:
            rest = {k: w for k, w in (node.meta.get("custom") or {}).items() if k != SOURCE}
            if rest:
                node.meta["custom"] = rest
            else:
                del node.meta["custom"]


def mark_left_in_training(node: torch.fx.Node, site: Site | None = None) -> None:
    """Mark a node of dynamo's graph whose site a training pass listed and left alone:
    every node traced from it (the pre-dispatch trace, AOT's) carries the mark, and the
    post-AOT passes do not list it again (claim_sites_left_in_training). With `site`
    (training_sdpa_to_fusion's row) the mark names the row, so that this pass, should
    its rule read the call's decomposition, keeps one row for the call (_one_row_per_call)."""
    value = id(site) if site is not None else True
    node.meta["custom"] = {**(node.meta.get("custom") or {}), LEFT_IN_TRAINING: value}


def _one_row_per_call(traced: torch.fx.GraphModule, report: Report, first_row: int) -> None:
    """An SDPA call training_sdpa_to_fusion listed and left alone, whose decomposition
    TRAINING_EAGER_RULE matched here (e.g. 3-D q/k/v: SDPA's math form): fused, its row
    becomes this rule's (the earlier one is dropped); left alone, the earlier row (with
    the SDPA call's reason) stays and this rule's is dropped."""
    by_id = {id(s): s for s in report.sites}
    new_rows = {id(s) for s in report.sites[first_row:]}
    drop = set()
    for node in traced.graph.nodes:
        custom = node.meta.get("custom") or {}
        earlier = custom.get(SDPA_ROW) if node.op == "call_function" else None
        if earlier in by_id:  # a fused call that replaces an SDPA call's row
            drop.add(earlier)
            record = by_id.get(custom.get(SITE_ID))
            if record is not None:
                record.notes = [*record.notes, f"an SDPA call the SDPA rewrite leaves alone ({by_id[earlier].reason}), "
                                               "fused through its decomposition"]
        claimed = node.meta.get(CLAIMED)
        if isinstance(claimed, Site) and id(claimed) in new_rows and \
                custom.get(LEFT_IN_TRAINING) in by_id and custom.get(LEFT_IN_TRAINING) not in new_rows:
            drop.add(id(claimed))
    if drop:
        report.sites[:] = [s for s in report.sites if id(s) not in drop]


def claim_sites_left_in_training(gm: torch.fx.GraphModule) -> None:
    """In a post-AOT graph: a softmax this pass already listed (left alone, with its
    reason, in the "training" graph) is claimed, so no post-AOT rule lists it again."""
    for node in gm.graph.nodes:
        if (node.meta.get("custom") or {}).get(LEFT_IN_TRAINING):
            node.meta.setdefault(CLAIMED, True)


def install_graph(gm: torch.fx.GraphModule, traced: torch.fx.GraphModule) -> None:
    """Make gm compute `traced`'s graph: dynamo's placeholders' names, metadata and
    _dynamo_source are kept (AOT reads them), the traced constants become gm's attributes."""
    old = list(gm.graph.find_nodes(op="placeholder"))
    new = list(traced.graph.find_nodes(op="placeholder"))
    assert len(old) == len(new), (len(old), len(new))
    for mine, theirs in zip(new, old):
        meta = dict(theirs.meta)
        meta["val"] = mine.meta.get("val")
        mine.meta = meta
        mine.target = theirs.target
        mine._rename(theirs.name)
        for attr, value in vars(theirs).items():  # dynamo's own records (_dynamo_source: AOT's guards)
            if attr.startswith("_dynamo"):
                setattr(mine, attr, value)
    for node in traced.graph.find_nodes(op="get_attr"):
        setattr(gm, node.target, getattr(traced, node.target))
    gm.graph = traced.graph
    gm.recompile()


# ----------------------------------------------------------------------------
# The rule
# ----------------------------------------------------------------------------

def _walk_probs(softmax: torch.fx.Node) -> tuple[torch.fx.Node, list[torch.fx.Node], float] | None:
    """From the softmax forward to out = bmm(probs, V): (that bmm, the nodes between,
    the dropout probability in force: 0 for none, p=0 or train=False)."""
    chain, dropout_p = [], 0.0
    node = softmax
    while True:
        steps = [u for u in node.users
                 if (is_call(u, aten.bmm.default) and u.args[0] is node)
                 or keeps_element_order(u)
                 or (is_call(u, CASTS) and val(u).dtype.is_floating_point)
                 or is_call(u, aten.dropout.default)]
        if len(steps) != 1:
            return None
        user = steps[0]
        if is_call(user, aten.bmm.default):
            return user, chain, dropout_p
        if is_call(user, aten.dropout.default):
            p, train = user.args[1], user.args[2]
            if not isinstance(train, bool):
                return None
            if train and not isinstance(p, (int, float)):
                dropout_p = math.nan  # a probability the graph reads at run time
            elif train and p != 0:
                dropout_p = float(p)
        chain.append(user)
        node = user


def match_training_attention(softmax: torch.fx.Node) -> AttentionSite | None:
    rank = val(softmax).dim()
    if softmax.args[1] not in (-1, rank - 1) or rank not in (3, 4):
        return None
    scores = walk_scores(softmax.args[0])
    tail = _walk_probs(softmax)
    if scores is None or tail is None:
        return None
    bmm2, chain, dropout_p = tail
    site = site_from_chains(PATTERN, softmax, scores, bmm2, chain, around_softmax=(softmax,))
    if site is not None:
        site.dropout_p = dropout_p
    return site


AUTOCAST = "npu_attn_autocast"  # node meta: inside an autocast region of the traced graph


def mark_autocast_regions(gm: torch.fx.GraphModule) -> None:
    """Mark the nodes between _enter_autocast and _exit_autocast (dynamo's form of a
    torch.autocast block): there the ops' dtypes are autocast's, which the fused op
    (a custom op autocast does not cast) would not follow."""
    depth = 0
    for node in gm.graph.nodes:
        name = getattr(node.target, "__name__", "") if node.op == "call_function" else ""
        if name == "_enter_autocast":
            depth += 1
        elif name == "_exit_autocast":
            depth = max(depth - 1, 0)
        elif depth:
            node.meta[AUTOCAST] = True


def _autocast_reason(site: AttentionSite) -> str | None:
    device = val(site.query.node).device.type
    if site.anchor.meta.get(AUTOCAST) or torch.is_autocast_enabled(device):
        return ("inside torch.autocast: the program's matmuls run in autocast's dtype, which npu_fusion_attention "
                "(not an autocast op) would not follow")
    return None


def check_training_site(site: AttentionSite, ctx: PassContext) -> str | None:
    autocast = _autocast_reason(site)
    if autocast:
        return autocast
    if site.dropout_p:
        p = "known only at run time" if math.isnan(site.dropout_p) else f"p={site.dropout_p:g}"
        return (f"dropout {p} in training: npu_fusion_attention draws its dropout masks from its "
                "own RNG (seed/offset), so the result could not equal eager's")
    if site.sink is not None:
        return "a sink logit column (npu_fusion_attention's sink is not taken from training graphs)"
    return structure_reason(site)


def _same_value(got: torch.Tensor, wanted: torch.Tensor) -> None:
    if got.dtype != wanted.dtype or not same_shape(got.shape, wanted.shape):
        raise RewriteRefused(f"npu_fusion_attention would return {got.dtype} {tuple(got.shape)} where the site "
                             f"returns {wanted.dtype} {tuple(wanted.shape)}")
    if not same_strides(got, wanted):
        raise RewriteRefused(f"npu_fusion_attention would return strides {got.stride()} where the site's later "
                             f"views need {wanted.stride()}")


def _per_query_head(rw: Rewrite, x: torch.fx.Node, heads: int) -> torch.fx.Node:
    """(B, N_kv, ...) -> (B, N, ...): query head h reads kv head h // (N / N_kv)."""
    kv_heads = val(x).shape[1]
    if kv_heads == heads:
        return x
    group = heads // kv_heads
    rest = list(val(x).shape[2:])
    x = rw.call(aten.unsqueeze.default, (x, 2))
    x = rw.call(aten.expand.default, (x, [-1, -1, group, *[-1] * len(rest)]))
    return rw.call(aten.reshape.default, (x, [rw.size(x, 0), heads, *[rw.size(x, 3 + i) for i in range(len(rest))]]))


def _uniform_rows(rw: Rewrite, out: torch.fx.Node, atten_mask: torch.fx.Node, q: torch.fx.Node,
                  k: torch.fx.Node, v: torch.fx.Node, scale: float, heads: int, added: bool) -> torch.fx.Node:
    """Rows whose every key the finfo.min mask removes, as eager computes them.

    Eager's row is softmax of equal scores: P = 1/n (n = S_kv), out = mean(V),
    dV_j += g/n. Its gradient at the scores is dS_j = (1/n) g.(V_j - mean V);
    where the mask is *added* (transformers' form) that reaches q and k:
    dq = scale * sum_j dS_j k_j, dk_j += scale * dS_j q. (A *fill*, masked_fill
    or where, zeroes it at every filled position: q and k get nothing.) For an
    added mask the row here is mean(V) + (X - X.detach()) with
    X = (scale/n) q @ (k^T @ W), W = (V - mean V) detached: X - X.detach() is
    exactly 0, and X's gradient is that dS through q and k (W detached: V's
    gradient comes from mean(V) alone)."""
    dtype = val(out).dtype
    mean = rw.call(aten.mean.dim, (v, [2], True))  # (B, N_kv, 1, D_v)
    row = _per_query_head(rw, mean, heads)
    if added:
        centred = rw.call(aten.detach.default, (rw.call(aten.sub.Tensor, (v, mean)),))
        kt_w = rw.call(aten.matmul.default, (rw.call(aten.transpose.int, (k, -2, -1)), centred))  # (B, N_kv, D, D_v)
        x = rw.call(aten.matmul.default, (q, _per_query_head(rw, kt_w, heads)))  # (B, N, S_q, D_v)
        x = rw.call(aten.div.Tensor, (rw.call(aten.mul.Tensor, (x, scale)), rw.size(k, 2)))
        zero = rw.call(aten.sub.Tensor, (x, rw.call(aten.detach.default, (x,))))
        row = rw.call(aten.add.Tensor, (row, zero))
    if val(row).dtype != dtype:
        row = rw.call(aten._to_copy.default, (row,), {"dtype": dtype})
    return rw.call(aten.where.self, (_empty_rows(rw, atten_mask), row, out))


def _nan_rows(rw: Rewrite, out: torch.fx.Node, atten_mask: torch.fx.Node, q: torch.fx.Node, k: torch.fx.Node,
              v: torch.fx.Node, heads: int, added: bool) -> torch.fx.Node:
    """Rows whose every key a -inf mask removes, as eager computes them: NaN, and NaN
    gradients (even where the incoming gradient is 0) to every value of the row's
    (batch, head), as eager's P^T g gives; where the mask is *added*, also to the
    row's query and every key of its (batch, head) (a fill zeroes the scores'
    gradient at the filled positions, an addition passes eager's NaN on)."""
    parts = [_per_query_head(rw, rw.call(aten.sum.dim_IntList, (v, [2, 3], True)), heads)]
    if added:
        parts.append(rw.call(aten.sum.dim_IntList, (q, [-1], True)))  # (B, N, S_q, 1)
        parts.append(_per_query_head(rw, rw.call(aten.sum.dim_IntList, (k, [2, 3], True)), heads))
    total = parts[0]
    for part in parts[1:]:
        total = rw.call(aten.add.Tensor, (total, part))
    empty = _empty_rows(rw, atten_mask)
    # NaN on empty rows, 0 elsewhere: a plain NaN factor would also turn the zero
    # gradient of the rows where() does not select into NaN.
    nan, zero = (rw.call(aten.scalar_tensor.default, (x,), {"dtype": val(total).dtype, "device": val(total).device})
                 for x in (math.nan, 0.0))
    nan_row = rw.call(aten.mul.Tensor, (total, rw.call(aten.where.self, (empty, nan, zero))))
    if val(nan_row).dtype != val(out).dtype:
        nan_row = rw.call(aten._to_copy.default, (nan_row,), {"dtype": val(out).dtype})
    return rw.call(aten.where.self, (empty, nan_row, out))


def tensor_scalars(gm: torch.fx.GraphModule) -> None:
    """x * s where s = _local_scalar_dense(t) of a 0-d float tensor t (dynamic=True makes
    Python floats graph inputs; pre-dispatch tracing reads them back as SymFloats) becomes
    x * t: the same result (a 0-d tensor does not promote x's dtype, nor does a Python
    float), in the form the scores walk reads as a runtime scale."""
    for node in gm.graph.find_nodes(op="call_function", target=aten._local_scalar_dense.default):
        tensor = node.args[0]
        if not (isinstance(val(tensor), torch.Tensor) and val(tensor).dim() == 0 and
                val(tensor).dtype.is_floating_point):
            continue
        for user in list(node.users):
            if is_call(user, (aten.mul.Tensor, aten.div.Tensor)) and user.args[1] is node and \
                    isinstance(val(user.args[0]), torch.Tensor) and val(user.args[0]).dim() > 0 and \
                    val(user.args[0]).dtype.is_floating_point:
                user.replace_input_with(node, tensor)


def scalar_reads_restored(gm: torch.fx.GraphModule) -> None:
    """Undo tensor_scalars where its x * t is still in the graph (the query a runtime
    scale was folded into, or a site left alone): x * _local_scalar_dense(t) again.
    AOT's tensorify_python_scalars turns exactly that form back into tensor math and
    keeps the float an input; a float input it never sees read as a scalar it
    specializes, and dynamo restarts the compile with the float a constant (so the
    runtime scale would never reach a compiled graph)."""
    for item in gm.graph.find_nodes(op="call_function", target=aten._local_scalar_dense.default):
        tensor = item.args[0]
        if tensor.op != "placeholder" or not isinstance(val(tensor), torch.Tensor) or val(tensor).dim() != 0 or \
                val(tensor).requires_grad or not val(tensor).dtype.is_floating_point:
            continue
        for user in list(tensor.users):
            if user is not item and is_call(user, (aten.mul.Tensor, aten.div.Tensor)) and \
                    user.args[1] is tensor and isinstance(val(user.args[0]), torch.Tensor) and \
                    val(user.args[0]).dtype.is_floating_point:
                user.replace_input_with(tensor, item)


def rewrite_training_site(rw: Rewrite, site: AttentionSite, ctx: PassContext, record: Site) -> list[torch.fx.Node]:
    q, k, v = site.query.build(rw), site.key.build(rw), site.value.build(rw)
    q, notes = fold_runtime_scales(rw, site, q)  # softmax(s * q k^T) = softmax((s * q) k^T)
    heads, kv_heads = static_int(val(q).shape[1]), static_int(val(k).shape[1])
    if heads is None or kv_heads is None:
        raise RewriteRefused(f"symbolic head counts N={val(q).shape[1]}, N_kv={val(k).shape[1]}")
    scale = site_scale(site, q)
    plan = plan_mask(rw, site.terms, site.score_rank, q, k, softmax_nan_rows=site.softmax_nan_rows)
    notes += [n for n in plan.notes if "fix-up" not in n]
    op_q, op_scale, fixup = q, scale, None
    if plan.pse_shift is not None:
        # scale * (q k^T + pse) is what the op computes; the program adds its terms after scaling.
        if scale != 1.0:
            op_q, op_scale = rw.call(aten.mul.Tensor, (q, scale)), 1.0
            notes.append("scale folded into the query (pse is added before the op's scale)")
        # Masks among the added terms (no atten_mask: a finfo.min with other terms) the op adds
        # in float32 exactly as the program does, so rows with no key are uniform there too.
        if plan.atten_mask is not None and (plan.fully_masked_fixup or plan.empty_rows_nan):
            raise RewriteRefused("a mask that may remove every key of a row, with an additive bias as well: "
                                 "eager's gradient to the bias on such rows is not reproduced")
    elif plan.fully_masked_fixup or plan.empty_rows_nan:
        fixup = "uniform" if plan.fully_masked_fixup else "nan"
        # Only masks here (no bias): each is added or a fill, and on a row with no key
        # that decides where eager's gradient goes.
        added = {term.fill is None for term in site.terms}
        if len(added) != 1:
            raise RewriteRefused("masks both added and filled (masked_fill/where) that may remove every key of a "
                                 "row: eager's gradient on such rows depends on their order")
        added = added.pop()
    band = plan.band  # a mask proved to be a band: a sparse mode, no (S_q, S_kv) mask
    if band is not None:
        mask_kwargs = dict(atten_mask=causal_mask_node(rw, q, ctx), sparse_mode=band.sparse_mode,
                           pre_tockens=band.pre_tokens, next_tockens=band.next_tokens)
    else:
        mask_kwargs = dict(atten_mask=plan.atten_mask, sparse_mode=1 if plan.atten_mask is not None else 0)
    fused = rw.call(npu_attn.npu_fusion_attention.default, (op_q, k, v, heads, "BNSD"),
                    dict(pse=plan.pse_shift, scale=op_scale, **mask_kwargs))
    mark_site(fused, record)
    sdpa_row = (site.anchor.meta.get("custom") or {}).get(LEFT_IN_TRAINING)
    if isinstance(sdpa_row, int) and not isinstance(sdpa_row, bool):  # SDPA's decomposition: one row per call
        fused.meta["custom"][SDPA_ROW] = sdpa_row
    out = rw.call(operator.getitem, (fused, 0))
    if fixup == "uniform":
        out = _uniform_rows(rw, out, plan.atten_mask, q, k, v, scale, heads, added)
        notes.append("fully-masked-row fix-up (finfo.min mask: rows with no key get eager's mean of V, with "
                     "eager's gradients)")
    elif fixup == "nan":
        out = _nan_rows(rw, out, plan.atten_mask, q, k, v, heads, added)
        notes.append("fully-masked-row fix-up (-inf mask: rows with no key get eager's NaN, and NaN gradients)")
    if site.flat_output:
        out = rw.call(aten.reshape.default, (out, [-1, rw.size(out, 2), rw.size(out, 3)]))
    _same_value(val(out), val(site.output))
    rw.replace(site.output, out)
    record.fused_op, record.layout = "npu_fusion_attention", "BNSD"
    record.sparse_mode = mask_kwargs["sparse_mode"]
    record.gqa_ratio = heads // kv_heads
    record.notes = notes
    return [site.output, *site.internal]


TRAINING_EAGER_RULE = Rule(
    name=PATTERN, kind="attention", anchors=SOFTMAXES, match=match_training_attention,
    check=check_training_site, rewrite=rewrite_training_site, anchor_of=lambda site: site.output,
    claims=lambda site: [site.anchor])


def training_eager_attention_to_fusion(gm: torch.fx.GraphModule, report: Report, ctx: PassContext) -> RuleStats:
    """Rewrite every hand-written attention of dynamo's training graph `gm` into
    npu_fusion_attention (gm's graph is replaced by a pre-dispatch ATen graph
    only when a site is rewritten)."""
    if not _may_hold_attention(gm):
        return RuleStats()
    try:
        traced = pre_dispatch_graph(gm)
        tensor_scalars(traced)
        mark_autocast_regions(traced)
    except Exception as error:  # noqa: BLE001 - the graph stays as dynamo made it; AOT and the later passes run
        log.info("training graph: not traced to pre-dispatch ATen (%s: %s); hand-written attention is left to "
                 "the post-AOT passes", type(error).__name__, str(error).splitlines()[0] if str(error) else "")
        return RuleStats()
    first_row = len(report.sites)
    stats = apply_rules(traced, (TRAINING_EAGER_RULE,), report, ctx)
    _one_row_per_call(traced, report, first_row)
    if stats.rewritten:
        scalar_reads_restored(traced)
        install_graph(gm, traced)
    _mark_left_alone(gm, traced, installed=bool(stats.rewritten))
    return stats
