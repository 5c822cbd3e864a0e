"""The tests' models are the package's built-in demo models (npu_attn_graph.demos)."""

from npu_attn_graph.demos import DECODERS, IMPLEMENTATIONS, LAYERS, build, scenario_call  # noqa: F401

SCENARIOS = [(kind, attn, scenario) for kind in DECODERS for attn in IMPLEMENTATIONS
             for scenario in ("prefill", "static_prefill", "static_decode")] + \
            [("bert", attn, "prefill") for attn in IMPLEMENTATIONS]
