"""FX helpers shared by the passes: fake values, scalar constants, aliasing,
and the Rewrite transaction every rule inserts its nodes through."""

from __future__ import annotations

import math
import operator
from typing import Any, Iterable, cast

import torch
from torch.fx.experimental.symbolic_shapes import free_symbols, statically_known_true

from ..kernels._library import NpuAttnArgumentError

aten = torch.ops.aten
prims = torch.ops.prims

# Node meta keys shared by the passes.
SITE = "npu_attn_site"  # a fused node -> its report Site (later passes refine the record)
# The ATen spellings of a softmax over one dim, and of a dtype cast, after AOT.
SOFTMAXES = (aten._softmax.default, aten.softmax.int, aten._safe_softmax.default)
CASTS = (aten._to_copy.default, prims.convert_element_type.default)

CLAIMED = "npu_attn_claimed"  # a node a rule looked at and left alone -> its Site (not reported twice)
CONSTANT = "npu_attn_constant"  # computed from constants only: executors may fold it
INSERTED = "npu_attn_inserted"  # built by a pass (shared_subexpressions may merge equal ones)


class RewriteRefused(Exception):
    """A rule cannot rewrite a site; the message is the report's reason."""


def val(node: object) -> Any:
    """The fake value (meta["val"]) of a node, or None for non-nodes and nodes without one."""
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def dynamo_val(node: object) -> Any:
    """val(node) on dynamo's graph (before AOT), where only nodes a pass made carry
    meta["val"]: dynamo's own nodes carry their fake value as meta["example_value"]."""
    found = val(node)
    return found if found is not None or not isinstance(node, torch.fx.Node) else node.meta.get("example_value")


def is_call(node: object, targets: object) -> bool:
    """node is a call_function of `targets` (one target or a tuple of them)."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_function":
        return False
    return node.target in targets if isinstance(targets, (tuple, list, set, frozenset)) else node.target is targets


def arg_node(node: torch.fx.Node, index: int) -> torch.fx.Node:
    """node.args[index] where the matched pattern holds a node (typed for the checker, not checked)."""
    return cast(torch.fx.Node, node.args[index])


def call_arg(node: torch.fx.Node, index: int, name: str, default: object) -> Any:
    """A call's argument by position, else by keyword, else the schema's default (Any: its kind is
    the schema's, which the caller knows)."""
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def static_int(x: object) -> int | None:
    """x as a Python int when it has no free symbols, else None."""
    if isinstance(x, int):
        return x
    if isinstance(x, torch.SymInt) and not free_symbols(x):
        return int(x)
    return None


def same_size(a: object, b: object) -> bool:
    return statically_known_true(a == b)


def same_shape(a: Iterable, b: Iterable) -> bool:
    a, b = tuple(a), tuple(b)
    return len(a) == len(b) and all(same_size(x, y) for x, y in zip(a, b))


def same_strides(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal strides wherever the size is not 1 (a size-1 dim's stride never matters)."""
    if not same_shape(a.shape, b.shape):
        return False
    return all(same_size(n, 1) or same_size(sa, sb) for n, sa, sb in zip(a.shape, a.stride(), b.stride()))


def require_same_value(old: torch.fx.Node, new: torch.fx.Node, what: str) -> None:
    """Raise RewriteRefused unless `new` (a replacement, named `what`) has `old`'s dtype,
    shape and strides: readers of `old` (views AOT recorded) read `new` unchanged."""
    a, b = val(old), val(new)
    if a.dtype != b.dtype or not same_shape(a.shape, b.shape):
        raise RewriteRefused(f"{what} gives {b.dtype}{list(b.shape)} where the site gives {a.dtype}{list(a.shape)}")
    if not same_strides(a, b):
        raise RewriteRefused(f"{what}'s strides {list(b.stride())} differ from the site's {list(a.stride())}")


# ----------------------------------------------------------------------------
# Constants
# ----------------------------------------------------------------------------

SCALAR_CONSTRUCTORS = (aten.scalar_tensor.default, aten.full.default, aten.zeros.default, aten.ones.default,
                       aten.full_like.default, aten.zeros_like.default, aten.ones_like.default)


def scalar_constant(node: object) -> float | None:
    """The value of a Python number, or of a node that is a constant-filled tensor
    (scalar_tensor / full / zeros / ones and their _like forms, through dtype casts
    that keep the value), else None."""
    if isinstance(node, bool):
        return float(node)
    if isinstance(node, (int, float)):
        return float(node)
    if not isinstance(node, torch.fx.Node) or node.op != "call_function":
        return None
    if node.target in (aten._to_copy.default, prims.convert_element_type.default, aten.lift_fresh_copy.default,
                       aten.clone.default, aten.expand.default):
        inner = scalar_constant(node.args[0])
        if inner is None:
            return None
        dtype = getattr(val(node), "dtype", None)
        if dtype is not None and dtype.is_floating_point and math.isfinite(inner):
            cast = torch.tensor(inner, dtype=dtype).item()  # the value as that dtype holds it
            return cast
        return inner
    target = node.target
    if target is aten.scalar_tensor.default:
        value = node.args[0]
    elif target in (aten.full.default, aten.full_like.default):
        value = node.args[1]
    elif target in (aten.zeros.default, aten.zeros_like.default):
        value = 0.0
    elif target in (aten.ones.default, aten.ones_like.default):
        value = 1.0
    else:
        return None
    return float(value) if isinstance(value, (int, float, bool)) else None


def is_full_slice(node: Any) -> bool:
    """node is x[..., 0:end, ...] with step 1 and end at or past the dim's size:
    a view equal to x. Symbolic shapes keep such no-op slices in the graph
    (x[:, :, None] of a tensor with a symbolic batch)."""
    if not is_call(node, aten.slice.Tensor):
        return False
    dim, start, end, step = (list(node.args[1:]) + [0, None, None, 1][len(node.args) - 1:])[:4]
    size = val(node.args[0]).shape[dim]
    # x[a:] traces end as sys.maxsize, which no symbolic size is known to stay under.
    unbounded = end is None or (isinstance(end, int) and end >= 2**62)
    return start in (0, None) and step == 1 and (unbounded or statically_known_true(end >= size))


def skip_full_slices(node: Any) -> Any:
    while is_full_slice(node):
        node = node.args[0]
    return node


# ----------------------------------------------------------------------------
# Aliasing: which nodes are views of which
# ----------------------------------------------------------------------------


def is_view(node: torch.fx.Node) -> bool:
    """node's value aliases its first argument (a view op by its schema, or an
    element of a view op's tuple result)."""
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        return isinstance(node.args[0], torch.fx.Node) and is_view(node.args[0])
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return False
    return any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns)


def returns_mutated_input(node: torch.fx.Node) -> bool:
    """node mutates its first argument in place and returns it (scatter_update_)."""
    schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
    return schema is not None and any(r.alias_info is not None and r.alias_info.is_write for r in schema.returns)


def views_of(node: torch.fx.Node) -> set[torch.fx.Node]:
    """node and every node that is (transitively) a view of it, or the result of
    an in-place write into it."""
    seen, todo = {node}, [node]
    while todo:
        for user in todo.pop().users:
            if user not in seen and (is_view(user) or returns_mutated_input(user)) and user.args \
                    and user.args[0] in seen:
                seen.add(user)
                todo.append(user)
    return seen


def cache_root(node: Any) -> Any:
    """The graph input an in-place writer's result aliases (node itself otherwise)."""
    while isinstance(node, torch.fx.Node) and returns_mutated_input(node):
        node = node.args[0]
    return node


def graph_order(graph: torch.fx.Graph) -> dict[torch.fx.Node, int]:
    return {n: i for i, n in enumerate(graph.nodes)}


# ----------------------------------------------------------------------------
# Rewrite: insert nodes with fake values, validate, then commit or roll back
# ----------------------------------------------------------------------------


def fake_result(target: Any, args: tuple, kwargs: dict, fake_mode: Any = None) -> Any:
    """target run on the fake values of its node arguments, in fake_mode (default:
    the mode of the first fake tensor among them)."""
    vals = torch.fx.node.map_arg((args, kwargs), lambda n: n.meta["val"])
    if fake_mode is None:
        fake_mode = next((t.fake_mode for t in torch.utils._pytree.tree_leaves(vals) if hasattr(t, "fake_mode")),
                         None)
    if fake_mode is None:
        return target(*vals[0], **vals[1])
    with fake_mode:
        return target(*vals[0], **vals[1])


def insert_call(gm: torch.fx.GraphModule, target: Any, args: tuple, kwargs: dict | None = None, *,
                before: torch.fx.Node | None = None, after: torch.fx.Node | None = None) -> torch.fx.Node:
    """Insert target(*args, **kwargs) next to a node, with its fake value and the
    neighbour's source location (for passes that edit existing fused nodes)."""
    kwargs = kwargs or {}
    anchor = before if before is not None else after
    assert anchor is not None, "insert_call: give before or after"
    with (gm.graph.inserting_before(before) if before is not None else gm.graph.inserting_after(after)):
        node = gm.graph.call_function(target, args, kwargs)
    node.meta["val"] = fake_result(target, args, kwargs)
    node.meta[INSERTED] = True
    for key in ("stack_trace", "nn_module_stack", "source_fn_stack"):
        if key in anchor.meta:
            node.meta[key] = anchor.meta[key]
    return node


def _symbolic_leaves(tree: object) -> list:
    return [x for x in torch.utils._pytree.tree_leaves(tree)
            if isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)) and free_symbols(x)]


class Rewrite:
    """One rewrite of a graph, as a transaction.

    ``call`` inserts a node before the anchor and computes its fake value right
    away, so an op's own validation (its fake implementation) runs on the site's
    fake values: an NpuAttnArgumentError, or any other failure to build, raises
    RewriteRefused with the reason. ``replace`` records a substitution that is
    applied only by ``commit``; ``rollback`` erases every inserted node, leaving
    the graph exactly as it was. Symbolic sizes are never written into the graph
    as literals: ``size`` gives a static int or a sym_size node, and ``call``
    refuses arguments that still hold a free symbol."""

    def __init__(self, gm: torch.fx.GraphModule, anchor: torch.fx.Node) -> None:
        self.gm, self.graph, self.anchor = gm, gm.graph, anchor
        self.inserted: list[torch.fx.Node] = []
        self.replacements: list[tuple[torch.fx.Node, torch.fx.Node]] = []
        self.fake_mode = next((v.fake_mode for n in gm.graph.nodes
                               if isinstance(v := val(n), torch.Tensor) and hasattr(v, "fake_mode")), None)

    # -- building -----------------------------------------------------------

    def call(self, target, args: tuple, kwargs: dict | None = None, *, meta_from: torch.fx.Node | None = None
             ) -> torch.fx.Node:
        kwargs = dict(kwargs or {})
        symbolic = _symbolic_leaves((args, kwargs))
        if symbolic:
            raise RewriteRefused(f"symbolic value {symbolic[0]} would be written into the graph as a literal "
                                 f"(argument of {_name(target)})")
        try:
            value = fake_result(target, args, kwargs, self.fake_mode)
        except NpuAttnArgumentError as error:
            raise RewriteRefused(str(error)) from None
        except Exception as error:  # noqa: BLE001 - any failure to build leaves the site alone, with the reason
            raise RewriteRefused(f"{_name(target)} rejects the site's values: {type(error).__name__}: "
                                 f"{str(error).strip().splitlines()[0] if str(error).strip() else ''}") from None
        with self.graph.inserting_before(self.anchor):
            node = self.graph.call_function(target, args, kwargs)
        node.meta["val"] = value
        node.meta[INSERTED] = True
        source = meta_from if meta_from is not None else self.anchor
        for key in ("stack_trace", "nn_module_stack", "source_fn_stack"):
            if key in source.meta:
                node.meta[key] = source.meta[key]
        self.inserted.append(node)
        return node

    def size(self, tensor: torch.fx.Node, dim: int) -> int | torch.fx.Node:
        """tensor.shape[dim] as an int, or as a sym_size node when it is symbolic."""
        n = val(tensor).shape[dim]
        static = static_int(n)
        return static if static is not None else self.call(aten.sym_size.int, (tensor, dim))

    def sizes(self, tensor: torch.fx.Node) -> list:
        return [self.size(tensor, d) for d in range(val(tensor).dim())]

    def checkpoint(self) -> tuple[int, int]:
        return len(self.inserted), len(self.replacements)

    def rollback(self, checkpoint: tuple[int, int] = (0, 0)) -> None:
        """Undo what was built since `checkpoint` (everything by default)."""
        nodes, replacements = checkpoint
        del self.replacements[replacements:]
        while len(self.inserted) > nodes:
            self.graph.erase_node(self.inserted.pop())  # newest first: only later inserts use it

    # -- finishing ----------------------------------------------------------

    def replace(self, old: torch.fx.Node, new: torch.fx.Node) -> None:
        """On commit, every use of `old` becomes a use of `new`."""
        self.replacements.append((old, new))

    def commit(self) -> None:
        for old, new in self.replacements:
            # (the callback runs inside this call, so it sees this iteration's `new`)
            old.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)


def _name(target: object) -> str:
    name = getattr(target, "__name__", None) or str(target)
    return name.split(".")[0] if isinstance(target, torch._ops.OpOverload) else name


def erase_dead(graph: torch.fx.Graph, nodes: Iterable[torch.fx.Node]) -> None:
    """Erase the given nodes (a rule's replaced nodes) once unused, unless they
    mutate something, and whatever of their inputs becomes unused and is pure (a
    local eliminate_dead_code). A replaced node counts as pure even when torch
    tags it nondeterministic (SDPA's kernels, for their dropout)."""
    replaced = set(nodes)
    todo = list(replaced)
    while todo:
        node = todo.pop()
        if erased(node) or node.users or node.op in ("placeholder", "output"):
            continue
        schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
        mutates = schema is not None and schema.is_mutable
        if mutates or (node not in replaced and node.is_impure()):
            continue
        inputs = list(node.all_input_nodes)
        graph.erase_node(node)
        todo.extend(inputs)


def erased(node: torch.fx.Node) -> bool:
    return getattr(node, "_erased", False)
