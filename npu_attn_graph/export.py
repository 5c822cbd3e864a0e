"""torch.export programs with the npu_attn rewrites:

    ep = npu_attn_graph.export(model, args, kwargs, options={"report": report})
    torch.export.save(ep, "model.pt2")

The backend's post-AOT passes (passes.PIPELINE, stage POST_AOT, then the
completeness check) run on the exported program's graph, as they run on each
ATen graph AOT autograd hands the backend. Three differences between an
ExportedProgram and that graph are bridged here:

- IR level. torch.export's default program is the training IR, which keeps
  CompositeImplicitAutograd ops (F.scaled_dot_product_attention, matmul,
  softmax.int, linear); AOT autograd decomposes them (SDPA to the CPU flash
  kernel op, matmul to bmm, softmax to _softmax), and the rules read that form.
  The program is first decomposed with exactly those decompositions (the
  CompositeImplicitAutograd entries of torch.export.default_decompositions()),
  not with the core-ATen table, which would also rewrite SDPA into plain math.
  A program the user already decomposed to core ATen is handled too: SDPA's math
  is then read by the eager-attention rule like any hand-written attention.
- Assertions. The training IR checks every ``Tensor.to`` with an
  ``_assert_tensor_metadata`` node, which is one more reader of e.g. a softmax
  (the rules refuse a softmax read by anything but attention). Those on
  intermediate values are removed: their dtype, device and layout are fixed by
  the graph itself. Those on graph inputs stay (they check the caller).
- Mutations. AOT autograd (keep_inference_input_mutations) leaves an input or
  buffer mutation as ``copy_(input, new value)``, and the KV-cache rules read that
  copy_ to know the program writes the cache in place. An ExportedProgram
  returns the new value instead (a BUFFER_MUTATION or USER_INPUT_MUTATION
  output). The outputs are turned into copy_ nodes before the passes and back
  into outputs after them: a copy_ left standing gives its source; one the passes
  dropped because a fused writer now writes the input in place (scatter_update_)
  gives that writer's result, an alias of the input, so the signature still names
  the mutation and ``.module()`` copies the buffer onto itself (a no-op).

The fused ops are npu_attn ops registered at import (CompositeExplicitAutograd
reference kernels plus fake kernels), so the program survives
``run_decompositions()``, ``torch.export.save`` and ``torch.export.load`` in any
process that imported npu_attn_graph.
"""

from __future__ import annotations

import os
import reprlib
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence, cast

import torch
from torch._export.verifier import TrainingIRVerifier
from torch.export import ExportedProgram
from torch.export.graph_signature import ExportGraphSignature, OutputKind, OutputSpec, TensorArgument

from . import kernels  # noqa: F401  (registers the npu_attn ops)
from .backend import BackendOptions, _rewrite
from .passes import PassContext
from .passes._fx import cache_root, returns_mutated_input
from .report import Report

aten = torch.ops.aten

MUTATIONS = (OutputKind.BUFFER_MUTATION, OutputKind.USER_INPUT_MUTATION)


def export(model: torch.nn.Module | ExportedProgram, args: tuple = (), kwargs: dict[str, Any] | None = None, *,
           dynamic_shapes: Any = None, options: dict[str, Any] | None = None) -> ExportedProgram:
    """torch.export.export(model, args, kwargs, dynamic_shapes=...) with the npu_attn
    rewrites applied to the program (the backend's post-AOT passes and options).

    ``model`` may also be an ExportedProgram (then args, kwargs and dynamic_shapes
    must be left out): e.g. one the caller already decomposed with
    ``run_decompositions()``.

    ``options`` are the backend's (npu_attn_graph.backend.OPTION_DOCS) for a program
    that torch runs: ``passes``, ``fp32_attention`` and ``report`` (a Report to fill,
    or a callable receiving it). ``executor`` may only be ``"eager"`` and
    ``torchair_config`` is refused. The report is also the returned program's
    ``npu_attn_report`` attribute (in this process; it is not saved with the program).
    """
    opts = _parse_options(options)
    report = opts.report if isinstance(opts.report, Report) else Report()
    if isinstance(model, ExportedProgram):
        if args or kwargs or dynamic_shapes is not None:
            raise ValueError("npu_attn_graph.export: args, kwargs and dynamic_shapes must be left out when model is "
                             "an ExportedProgram (it was exported with its own), got "
                             f"args={reprlib.repr(args)}, kwargs={reprlib.repr(kwargs)}, "
                             f"dynamic_shapes={reprlib.repr(dynamic_shapes)}")
        program = model
    elif isinstance(model, torch.nn.Module):
        if not isinstance(args, tuple):
            raise ValueError(f"npu_attn_graph.export: args must be a tuple, got {type(args).__name__}")
        program = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes)
    else:
        raise ValueError("npu_attn_graph.export: model must be a torch.nn.Module or a torch.export.ExportedProgram, "
                         f"got {type(model).__name__}")
    program = program.run_decompositions(aot_decompositions())
    program = rewrite_program(program, opts, report)
    program.npu_attn_report = report  # type: ignore[attr-defined]  # the report rides on the program it describes
    return program


def _parse_options(options: dict[str, Any] | None) -> BackendOptions:
    options = dict(options or {})
    executor = options.get("executor", "eager")
    if executor != "eager":
        raise ValueError(f"npu_attn_graph.export: option 'executor' must be 'eager' (the exported program is run by "
                         f"torch, e.g. ExportedProgram.module()), got {executor!r}")
    return BackendOptions.parse({**options, "executor": "eager"})


def aot_decompositions() -> dict:
    """The decompositions AOT autograd applies before the backend's passes: those of
    CompositeImplicitAutograd ops. torch.export's default table adds the core-ATen
    ones (SDPA into math, among others), which the backend never sees."""
    from torch._export.utils import _collect_all_valid_cia_ops

    implicit = _collect_all_valid_cia_ops()
    return {op: fn for op, fn in torch.export.default_decompositions().items() if op in implicit}


def rewrite_program(program: ExportedProgram, opts: BackendOptions, report: Report) -> ExportedProgram:
    """The passes run on a copy of program's graph; a new ExportedProgram around it."""
    gm = torch.fx.GraphModule(program.graph_module, _copied_graph(program.graph_module.graph))
    _drop_intermediate_assertions(gm.graph)
    mutations = _mutations_as_copies(gm.graph, program.graph_signature)
    gm.recompile()
    assert opts.fp32_attention is not None  # BackendOptions.parse filled in the default
    _rewrite(gm, opts, report, PassContext("inference", "torch", opts.fp32_attention))
    output_specs = _copies_as_mutations(gm.graph, program.graph_signature, mutations)
    _iota_as_arange(gm.graph)
    gm.graph.eliminate_dead_code(is_impure_node=_impure)
    gm.graph.lint()
    gm.recompile()
    signature = ExportGraphSignature(input_specs=list(program.graph_signature.input_specs), output_specs=output_specs)
    verifiers = program.verifiers
    if any(returns_mutated_input(n) or _writes_in_place(n) for n in gm.graph.nodes):
        # The ATen dialect's verifier admits functional ops only; the training IR's
        # (torch.export.export's own default dialect) admits in-place ops, as ours.
        verifiers = [TrainingIRVerifier]
    return ExportedProgram(
        root=gm, graph=gm.graph, graph_signature=signature, state_dict=program.state_dict,
        range_constraints=program.range_constraints, module_call_graph=program.module_call_graph,
        example_inputs=program.example_inputs, constants=program.constants, verifiers=verifiers)


def _copied_graph(graph: torch.fx.Graph) -> torch.fx.Graph:
    copy = torch.fx.Graph()
    output = copy.graph_copy(graph, {})
    copy.output(output)
    return copy


def _impure(node: torch.fx.Node) -> bool:
    # Placeholders and in-place writers stay even when nothing reads them.
    return node.op == "placeholder" or node.is_impure() or returns_mutated_input(node) or _writes_in_place(node)


def _drop_intermediate_assertions(graph: torch.fx.Graph) -> None:
    for node in list(graph.find_nodes(op="call_function", target=aten._assert_tensor_metadata.default)):
        if not node.users and not (isinstance(node.args[0], torch.fx.Node) and node.args[0].op == "placeholder"):
            graph.erase_node(node)


def _iota_as_arange(graph: torch.fx.Graph) -> None:
    """prims.iota (the passes build the compressed causal mask with it) as aten.arange:
    the same values, and an ATen op that exporters such as torch.onnx translate."""
    for node in list(graph.find_nodes(op="call_function", target=torch.ops.prims.iota.default)):
        length = node.args[0]
        start, step = node.kwargs.get("start", 0), node.kwargs.get("step", 1)
        if not all(isinstance(x, int) for x in (length, start, step)) or node.kwargs.get("requires_grad", False):
            continue
        with graph.inserting_before(node):
            arange = graph.call_function(aten.arange.start_step, (start, start + length * step, step),
                                         {"dtype": node.kwargs["dtype"], "device": node.kwargs["device"]})
        arange.meta.update(node.meta)
        node.replace_all_uses_with(arange)
        graph.erase_node(node)


def _mutations_as_copies(graph: torch.fx.Graph, signature: ExportGraphSignature) -> dict[int, torch.fx.Node]:
    """Each mutation output -> copy_(its input, new value) before the output node;
    returns {output index: the mutated placeholder}."""
    placeholders = {n.name: n for n in graph.find_nodes(op="placeholder")}
    names: dict[str | None, str] = {
        **{buffer: name for name, buffer in signature.inputs_to_buffers.items()},
        **{spec.target: spec.arg.name for spec in signature.input_specs
           if spec.kind.name == "USER_INPUT" and isinstance(spec.arg, TensorArgument)}}
    output = graph.output_node()
    values = list(cast(Sequence[torch.fx.Node], output.args[0]))  # the output node holds a tuple of values
    mutations: dict[int, torch.fx.Node] = {}
    for i, spec in enumerate(signature.output_specs):
        if spec.kind not in MUTATIONS:
            continue
        target = placeholders[names[spec.target]] if spec.kind == OutputKind.BUFFER_MUTATION else \
            placeholders[spec.target]
        with graph.inserting_before(output):
            copy = graph.call_function(aten.copy_.default, (target, values[i]))
        copy.meta["val"] = target.meta["val"]
        mutations[i] = target
    return mutations


def _copies_as_mutations(graph: torch.fx.Graph, signature: ExportGraphSignature,
                         mutations: dict[int, torch.fx.Node]) -> list[OutputSpec]:
    """The copy_ nodes back into mutation outputs (see the module docstring);
    returns the output specs naming the new output nodes."""
    output = graph.output_node()
    values: list[torch.fx.node.Argument] = list(cast(Sequence[torch.fx.node.Argument], output.args[0]))
    for i, target in mutations.items():
        copies = [u for u in target.users if u.op == "call_function" and u.target is aten.copy_.default
                  and u.args[0] is target]
        if copies:
            copy = copies[-1]
            values[i] = copy.args[1]
            for c in copies:
                c.replace_all_uses_with(cast(torch.fx.Node, c.args[1]))  # copy_(target, value node)
                graph.erase_node(c)
            continue
        writers = [n for n in graph.nodes if n.op == "call_function" and returns_mutated_input(n)
                   and cache_root(n) is target]
        if writers:
            values[i] = writers[-1]
        elif any(_writes_in_place(n, target) for n in graph.nodes):
            # A writer that returns nothing (npu_scatter_pa_kv_cache writes both caches):
            # after it, the placeholder itself holds the new value.
            values[i] = target
        else:
            raise RuntimeError(f"npu_attn_graph.export: the program mutates {target.name}, but after the passes "
                               "neither a copy_ into it nor an in-place writer of it is left")
    output.args = (tuple(values),)
    specs = []
    for spec, value in zip(signature.output_specs, values):
        arg = spec.arg
        if isinstance(arg, TensorArgument) and isinstance(value, torch.fx.Node):
            arg = TensorArgument(name=value.name)
        specs.append(OutputSpec(kind=spec.kind, arg=arg, target=spec.target))
    return specs


def _writes_in_place(node: torch.fx.Node, target: torch.fx.Node | None = None) -> bool:
    """node is an op whose schema marks an argument written in place, and that argument is target
    (or a view of it; any argument when target is None)."""
    schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
    if schema is None:
        return False
    for i, arg in enumerate(schema.arguments):
        if arg.alias_info is None or not arg.alias_info.is_write:
            continue
        value = node.args[i] if i < len(node.args) and not arg.kwarg_only else node.kwargs.get(arg.name)
        if isinstance(value, torch.fx.Node) and (target is None or cache_root(value) is target):
            return True
    return False


AIR_NAME = "npu_attn_export"


def export_air(model: torch.nn.Module, args: tuple = (), kwargs: dict[str, Any] | None = None, *,
               f: str | os.PathLike, options: dict[str, Any] | None = None,
               progress: Callable[[str], None] | None = None) -> Report:
    """TorchAir's offline export (its ``dynamo_export``: the GE graph as an .air file for
    ATC) with the npu_attn passes at TorchAir's post-grad seam, as the backend's
    executor 'torchair' runs them; writes ``f`` and returns the report.

    TorchAir builds the export graph in Python (weights as constants, the fused ops
    as their GE op types) and hands it to GE's native ``export`` to serialize as .air.
    Off an NPU host TorchAir is loaded offline, without that native code: the graph
    is built, then GeRuntimeUnavailable is raised and nothing is written (``npu-attn-graph
    dump`` writes the same GE graph as pbtxt there).
    """
    from ._torchair_offline_native import GeRuntimeUnavailable
    from .backend import NpuAttnBackend
    from .torchair_bridge import load_torchair

    torchair = load_torchair(progress)
    from torchair._ge_concrete_graph.fx2ge_converter import ExportSuccess
    from torchair.npu_export import _get_export_config

    options = dict(options or {})
    for name in ("executor", "torchair_config"):
        if name in options:
            raise ValueError(f"npu_attn_graph.export_air: option {name!r} is set by export_air itself "
                             f"(executor 'torchair' with TorchAir's export config), got {options[name]!r}")
    report = options.pop("report", None)
    report = report if isinstance(report, Report) else Report()
    target = Path(f)
    with tempfile.TemporaryDirectory(prefix="npu_attn_air_") as scratch:
        # TorchAir's own export settings (export mode, path, name, weight names), as dynamo_export sets them.
        config = _get_export_config(model, scratch, AIR_NAME, torchair.module.CompilerConfig())
        backend = NpuAttnBackend(**options, executor="torchair", torchair_config=config, report=report)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=backend, fullgraph=True)
        try:
            with torch.no_grad():
                compiled(*args, **(kwargs or {}))
        except ExportSuccess:  # TorchAir's way of ending an export run
            pass
        except GeRuntimeUnavailable as error:
            if not str(error).startswith("export needs"):  # not the last step, the .air serialization
                raise
            fused = len(report.fused())
            raise GeRuntimeUnavailable(
                f"npu_attn_graph.export_air: TorchAir built the export GE graph ({fused}/{len(report.sites)} "
                f"sites fused), but serializing it as an .air file is GE's native code, which needs CANN on an "
                f"Ascend NPU host ({torchair.describe()}); nothing was written to {target}. The same GE graph "
                "as pbtxt: npu-attn-graph dump") from error
        finally:
            torch._dynamo.reset()
        written = sorted(Path(scratch).rglob("*.air"))
        if len(written) != 1:
            raise RuntimeError(f"npu_attn_graph.export_air: TorchAir's export wrote {len(written)} .air files "
                               f"({[p.name for p in written]}), expected one")
        shutil.copyfile(written[0], target)
    return report


__all__ = ["aot_decompositions", "export", "export_air", "rewrite_program"]
