"""Rules and the one driver that applies them.

A rule is a pattern, a check that returns the reason it fails, and a
rewrite, in the spirit of the onnxscript rewriter:

- ``match(node)`` looks at graph structure only, starting at one of the
  rule's anchor targets, and returns a match object (or None: not this form);
- ``check(match, ctx)`` returns why the match cannot be rewritten, or None;
- ``rewrite(rw, match, ctx, site)`` builds the replacement through a
  Rewrite transaction, in which the fused op's own validation runs; a
  RewriteRefused from it leaves the graph exactly as it was.

The driver walks the graph in order and matches each anchor when it reaches
it, so a site is always matched on the graph as earlier rewrites left it
(stacked attention: the second site's query is the first site's fused op).
Every match is recorded in the report, rewritten or not; a node a refused
match covers is marked claimed so the completeness check does not list it
twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterable, TypeVar

import torch

from ..report import Report, Site, node_location
from ._context import PassContext
from ._fx import CLAIMED, Rewrite, RewriteRefused, erase_dead, erased

M = TypeVar("M")


@dataclass(frozen=True)
class Rule(Generic[M]):
    name: str
    kind: str  # "attention", "kv_update" or "moe"
    anchors: tuple  # node targets a match starts at
    match: Callable[[torch.fx.Node], M | None]
    check: Callable[[M, PassContext], str | None]
    rewrite: Callable[[Rewrite, M, PassContext, Site], Iterable[torch.fx.Node]]  # returns nodes now dead
    anchor_of: Callable[[M], torch.fx.Node]  # where the rewrite inserts its nodes
    claims: Callable[[M], Iterable[torch.fx.Node]]  # nodes a refused match covers
    pattern_of: Callable[[M], str] | None = None  # the report's pattern name (default: the rule's name)
    # A match that covers several program statements (a key and a value write) is
    # listed once per statement: (node, pattern) each. Default: one row.
    rows_of: Callable[[M], list[tuple[torch.fx.Node, str]]] | None = None


@dataclass
class RuleStats:
    matched: int = 0
    rewritten: int = 0


def check_and_rewrite(gm: torch.fx.GraphModule, rule: Rule[M], match: M, ctx: PassContext,
                      site: Site | None) -> str | None:
    """One match: its check, then its rewrite as one transaction (committed, its dead
    nodes erased; or rolled back). The reason it was not rewritten, or None."""
    reason = rule.check(match, ctx)
    if reason is not None:
        return reason
    rw = Rewrite(gm, rule.anchor_of(match))
    try:
        dead = list(rule.rewrite(rw, match, ctx, site))  # type: ignore[arg-type]  # refinement rules take None
    except RewriteRefused as refused:
        rw.rollback()
        return str(refused)
    rw.commit()
    erase_dead(gm.graph, dead)
    return None


def apply_rules(gm: torch.fx.GraphModule, rules: tuple[Rule, ...], report: Report, ctx: PassContext) -> RuleStats:
    """Match, check and rewrite every site of `gm` the rules cover; returns counts."""
    anchors: dict[Any, list[Rule]] = {}
    for rule in rules:
        for target in rule.anchors:
            anchors.setdefault(target, []).append(rule)
    stats = RuleStats()
    changed = False
    for node in list(gm.graph.nodes):
        if erased(node) or node.op != "call_function" or CLAIMED in node.meta:
            continue
        for rule in anchors.get(node.target, ()):
            match = rule.match(node)
            if match is None:
                continue
            stats.matched += 1
            rows = rule.rows_of(match) if rule.rows_of else [
                (node, rule.pattern_of(match) if rule.pattern_of else rule.name)]
            sites = []
            for row_node, pattern in rows:
                layer, source = node_location(row_node)
                sites.append(Site(kind=rule.kind, graph=ctx.graph_name, layer=layer, source=source, pattern=pattern))
            report.sites.extend(sites)
            site = sites[0]
            site.reason = check_and_rewrite(gm, rule, match, ctx, site)
            if site.reason is None:
                stats.rewritten += 1
                changed = True
            if site.reason is not None:
                site.fused_op = None
                for claimed in rule.claims(match):
                    claimed.meta[CLAIMED] = site
            for other in sites[1:]:  # the other statements of the match share its outcome
                for name in ("reason", "fused_op", "layout", "sparse_mode", "gqa_ratio", "precision"):
                    setattr(other, name, getattr(site, name))
                other.notes = list(site.notes)
            break
    if changed:
        gm.graph.lint()
        gm.recompile()
    return stats
