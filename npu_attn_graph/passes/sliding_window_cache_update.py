"""Rule: sliding-window KV-cache writes (roll + write at the last slot) -> scatter_update.

(Work in progress: matches and reports the form.)
"""

from __future__ import annotations

import torch

from ..report import Report
from ._context import PassContext
from ._rules import Rule, RuleStats, apply_rules

aten = torch.ops.aten


def match_roll(node: torch.fx.Node):
    return None


SLIDING_WINDOW_RULE = Rule(
    name="sliding-window-cache-write", kind="kv_update", anchors=(aten.roll.default,), match=match_roll,
    check=lambda m, ctx: None, rewrite=lambda rw, m, ctx, site: [], anchor_of=lambda m: m, claims=lambda m: [m])


def sliding_window_cache_update(gm: torch.fx.GraphModule, report: Report, ctx: PassContext) -> RuleStats:
    return apply_rules(gm, (SLIDING_WINDOW_RULE,), report, ctx)
