"""The tests' models are the package's built-in demo models (npu_attn_graph.demo_models)."""

import dataclasses
import functools
import tempfile
import time
from typing import Any

import torch
import transformers

from npu_attn_graph import Report

from npu_attn_graph.demo_models import DECODERS, IMPLEMENTATIONS, LAYERS, build, scenario_call  # noqa: F401

SCENARIOS = [(kind, attn, scenario) for kind in DECODERS for attn in IMPLEMENTATIONS
             for scenario in ("prefill", "static_prefill", "static_decode")] + \
            [("bert", attn, "prefill") for attn in IMPLEMENTATIONS]


def generate_static_both_ways(model, backend, ids, new_tokens: int, options: dict | None = None):
    """Greedy generate() with a StaticCache, eagerly and with model.forward compiled
    by `backend`; returns (expected tokens, actual tokens, eager cache, compiled cache)."""
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        eager_cache = transformers.StaticCache(config=model.config, max_cache_len=32)
        expected = model.generate(ids, past_key_values=eager_cache, **kwargs)
        model.forward = torch.compile(model.forward, backend=backend, fullgraph=True, options=options)
        cache = transformers.StaticCache(config=model.config, max_cache_len=32)
        actual = model.generate(ids, past_key_values=cache, **kwargs)
    return expected, actual, eager_cache, cache


def assert_caches_close(cache, eager_cache, rtol: float, atol: float) -> None:
    """Every layer's tensors equal eager's; a sliding window the compiled steps left
    in ring order (the default sliding_window_cache="auto") read in eager's order."""
    from npu_attn_graph import ring_layout, window_in_eager_order

    for mine, theirs in zip(cache.layers, eager_cache.layers):
        for a, b in ((mine.keys, theirs.keys), (mine.values, theirs.values)):
            if ring_layout.is_ring(a):
                a = window_in_eager_order(a, mine.cumulative_length_int)
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------
# The model matrix (issue 12, tests/test_model_matrix.py): tiny random configs of
# thirteen transformers families, each attention implementation transformers
# supports, and the scenarios that apply to the family. Every case is run once
# (run_case, cached) and the tests check one property each on the measurement.

MATRIX_LAYERS = 2
WINDOW = 4  # sliding_window of the families that have one; the prompts are longer
PROMPT = 5  # static and dynamic scenarios: one prompt token past the window
MATRIX_NEW_TOKENS = 16
CACHE_LEN = 32
DYNAMIC_STEPS = 3  # DynamicCache decode steps after the prefill

# family: (model class, config class, attention implementations, kind, config fields)
_COMMON = dict(vocab_size=128, initializer_range=0.2)
_DECODER = dict(_COMMON, hidden_size=64, intermediate_size=128, num_hidden_layers=MATRIX_LAYERS,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
MATRIX_FAMILIES: dict[str, tuple[str, str, tuple[str, ...], str, dict]] = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", ("sdpa", "eager"), "decoder", dict(_DECODER, head_dim=16)),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", ("sdpa", "eager"), "decoder", _DECODER),
    "gpt2": ("GPT2LMHeadModel", "GPT2Config", ("sdpa", "eager"), "decoder",
             dict(_COMMON, n_embd=64, n_layer=MATRIX_LAYERS, n_head=4, n_positions=128)),
    "mistral": ("MistralForCausalLM", "MistralConfig", ("sdpa", "eager"), "decoder",
                dict(_DECODER, head_dim=16, sliding_window=WINDOW)),
    # Gemma2 and gpt-oss: transformers 5.23.0 has no sdpa path for them (_supports_sdpa False).
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", ("eager",), "decoder",
               dict(_DECODER, head_dim=16, sliding_window=WINDOW)),
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig", ("sdpa", "eager"), "decoder",
               dict(_DECODER, head_dim=16, sliding_window=WINDOW,
                    layer_types=["sliding_attention", "full_attention"])),
    "gpt-oss": ("GptOssForCausalLM", "GptOssConfig", ("eager",), "decoder",
                dict(_DECODER, head_dim=16, sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2)),
    "phi3": ("Phi3ForCausalLM", "Phi3Config", ("sdpa", "eager"), "decoder",
             dict(_DECODER, sliding_window=WINDOW, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", ("sdpa", "eager"), "decoder", dict(_DECODER, head_dim=16)),
    # Biases on q/k/v/o (attention_bias) and a rotary embedding over half of each head (Phi3 honours
    # partial_rotary_factor; transformers 5.23's Llama rotates the whole head whatever the factor says).
    "llama-bias": ("LlamaForCausalLM", "LlamaConfig", ("sdpa", "eager"), "decoder",
                   dict(_DECODER, head_dim=16, attention_bias=True)),
    "phi3-partial-rope": ("Phi3ForCausalLM", "Phi3Config", ("sdpa", "eager"), "decoder",
                          dict(_DECODER, partial_rotary_factor=0.5, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "t5": ("T5ForConditionalGeneration", "T5Config", ("sdpa", "eager"), "encoder-decoder",
           dict(_COMMON, d_model=64, d_kv=16, d_ff=128, num_layers=MATRIX_LAYERS, num_decoder_layers=MATRIX_LAYERS,
                num_heads=4, decoder_start_token_id=0, initializer_factor=1.0)),
    "bart": ("BartForConditionalGeneration", "BartConfig", ("sdpa", "eager"), "encoder-decoder",
             dict(_COMMON, d_model=64, encoder_layers=MATRIX_LAYERS, decoder_layers=MATRIX_LAYERS,
                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
                  max_position_embeddings=128, init_std=0.2, decoder_start_token_id=2, pad_token_id=1,
                  bos_token_id=0, eos_token_id=2, forced_eos_token_id=None)),
    "bert": ("BertModel", "BertConfig", ("sdpa", "eager"), "encoder",
             dict(_COMMON, hidden_size=64, num_hidden_layers=MATRIX_LAYERS, num_attention_heads=4,
                  intermediate_size=128, max_position_embeddings=128)),
    "vit": ("ViTModel", "ViTConfig", ("sdpa", "eager"), "encoder",
            dict(hidden_size=64, num_hidden_layers=MATRIX_LAYERS, num_attention_heads=4, intermediate_size=128,
                 image_size=16, patch_size=4, num_channels=3, initializer_range=0.2)),
}
MATRIX_SCENARIOS = {"decoder": ("prefill", "static", "dynamic"), "encoder-decoder": ("prefill", "static", "dynamic"),
                    "encoder": ("prefill",)}
MATRIX_CASES = [(family, attn, scenario) for family, (_, _, attns, kind, _) in MATRIX_FAMILIES.items()
                for attn in attns for scenario in MATRIX_SCENARIOS[kind]]


def build_matrix_model(family: str, attn: str) -> torch.nn.Module:
    """The family's tiny model (fixed seed, fp32, eval mode) with attention implementation `attn`."""
    cls_name, config_name, attns, _, fields = MATRIX_FAMILIES[family]
    if attn not in attns:
        raise ValueError(f"{family} has no {attn} attention in transformers {transformers.__version__}")
    config = getattr(transformers, config_name)(**fields)
    config._attn_implementation = attn
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(config).eval()
    if family == "gpt-oss":
        with torch.no_grad():  # the sinks start at zero: give every head its own
            for layer in model.model.layers:
                layer.self_attn.sinks.normal_(0.0, 1.0)
    return model


def matrix_kind(family: str) -> str:
    return MATRIX_FAMILIES[family][3]


def expected_sites(family: str, scenario: str, graphs: int) -> tuple[int, int]:
    """(attention sites, KV-cache writes) the report must list for the scenario's compiled graphs:
    every attention layer and every write into a cache input, in each graph."""
    kind, n = matrix_kind(family), MATRIX_LAYERS
    if kind == "encoder":
        return n, 0
    if kind == "decoder":
        return n * graphs, (2 * n * graphs if scenario == "static" else 0)  # DynamicCache: torch.cat, no write
    if scenario == "prefill":  # encoder self, decoder self, cross
        return 3 * n, 0
    if scenario == "static":  # the first step writes self and cross caches, the later ones self only
        return 2 * n * graphs, 4 * n + 2 * n * (graphs - 1)
    return 2 * n * graphs, 0


@dataclasses.dataclass
class CaseResult:
    """What one (family, attn, scenario) case measured; every field is filled even when a step fails."""

    family: str
    attn: str
    scenario: str
    report: Report | None = None
    error: str | None = None  # the compiled run raised
    numerics: str | None = None  # the first mismatch with eager (None: equal)
    tokens_equal: bool | None = None  # static generate() only
    ge: Any = None  # GeConversion of the prefill (prefill) or of the static decode step (static)
    ge_error: str | None = None
    seconds: float = 0.0

    @property
    def name(self) -> str:
        return f"{self.family} {self.attn} {self.scenario}"


def _first_mismatch(pairs) -> str | None:
    for label, actual, expected in pairs:
        try:
            torch.testing.assert_close(actual, expected, rtol=MATRIX_RTOL, atol=MATRIX_ATOL)
        except AssertionError as error:
            return f"{label}: {' '.join(str(error).split())[:300]}"
    return None


MATRIX_RTOL, MATRIX_ATOL = 1e-4, 1e-5  # fp32 logits, hidden states and caches


def _ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def _self_caches(cache):
    return cache.self_attention_cache if isinstance(cache, transformers.EncoderDecoderCache) else cache


def _static_cache(model, encoder_length: int | None):
    cache = transformers.StaticCache(config=model.config, max_cache_len=CACHE_LEN)
    if encoder_length is None:
        return cache
    return transformers.EncoderDecoderCache(cache, transformers.StaticCache(config=model.config,
                                                                            max_cache_len=encoder_length))


def _dynamic_cache(model, encoder_decoder: bool):
    if not encoder_decoder:
        return transformers.DynamicCache(config=model.config)
    return transformers.EncoderDecoderCache(transformers.DynamicCache(config=model.config),
                                            transformers.DynamicCache(config=model.config))


def prefill_call(family: str, model) -> tuple[tuple, dict]:
    """(args, kwargs) of the prefill: a batch of 2, no cache."""
    kind = matrix_kind(family)
    if family == "vit":
        return (torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)),), {}
    ids = _ids(2, 7)
    mask = torch.ones_like(ids)
    if kind == "encoder":
        mask[1, 5:] = 0  # right padding: the encoder's usual batch
        return (ids,), {"attention_mask": mask}
    if kind == "encoder-decoder":
        return (ids,), {"attention_mask": mask, "decoder_input_ids": _ids(2, 5, seed=2), "use_cache": False}
    return (ids,), {"attention_mask": mask, "use_cache": False}


def static_decode_call(family: str, model) -> tuple[tuple, dict]:
    """(args, kwargs) of one static-cache decode step after an eager prefill (decoders: a prompt longer
    than the sliding window, so the step slides a full window; encoder-decoders: the first decoder step
    wrote the cross-attention caches)."""
    with torch.no_grad():
        if matrix_kind(family) == "decoder":
            ids = _ids(2, PROMPT)
            cache = _static_cache(model, None)
            logits = model(ids, past_key_values=cache, use_cache=True, cache_position=torch.arange(PROMPT)).logits
            return (logits[:, -1:].argmax(-1),), {"past_key_values": cache, "use_cache": True,
                                                  "cache_position": torch.tensor([PROMPT])}
        ids = _ids(2, 7)
        encoder_outputs = model.get_encoder()(input_ids=ids)
        cache = _static_cache(model, ids.shape[1])
        start = torch.full((2, 1), model.config.decoder_start_token_id)
        logits = model(encoder_outputs=encoder_outputs, decoder_input_ids=start, past_key_values=cache,
                       use_cache=True, cache_position=torch.arange(1)).logits
        return (), {"encoder_outputs": encoder_outputs, "decoder_input_ids": logits[:, -1:].argmax(-1),
                    "past_key_values": cache, "use_cache": True, "cache_position": torch.tensor([1])}


def _output(result) -> torch.Tensor:
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


def _run_prefill(family, model, backend):
    args, kwargs = prefill_call(family, model)
    expected = _output(model(*args, **kwargs))
    actual = _output(torch.compile(model, backend=backend)(*args, **kwargs))
    if "attention_mask" in kwargs and matrix_kind(family) == "encoder":
        valid = kwargs["attention_mask"].bool()  # padded rows are undefined
        expected, actual = expected[valid], actual[valid]
    return _first_mismatch([("prefill output", actual, expected)]), None


def _run_static(family, model, backend):
    encoder_decoder = matrix_kind(family) == "encoder-decoder"
    ids = _ids(2, 7 if encoder_decoder else PROMPT)
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=MATRIX_NEW_TOKENS,
                  min_new_tokens=MATRIX_NEW_TOKENS, do_sample=False, pad_token_id=0)
    encoder_length = ids.shape[1] if encoder_decoder else None
    eager_cache = _static_cache(model, encoder_length)
    expected = model.generate(ids, past_key_values=eager_cache, **kwargs)
    cache = _static_cache(model, encoder_length)
    model.forward = torch.compile(model.forward, backend=backend)
    try:
        actual = model.generate(ids, past_key_values=cache, **kwargs)
    finally:
        del model.forward  # the instance attribute: model.forward is the class's again
    pairs = [(f"layer {i} {name}", getattr(mine, name), getattr(theirs, name))
             for i, (mine, theirs) in enumerate(zip(_self_caches(cache).layers, _self_caches(eager_cache).layers))
             for name in ("keys", "values")]
    tokens_equal = actual.shape == expected.shape and torch.equal(actual, expected)
    mismatch = None if tokens_equal else f"tokens differ: eager {expected.tolist()}, compiled {actual.tolist()}"
    return mismatch or _first_mismatch(pairs), tokens_equal


def _run_dynamic(family, model, backend):
    """DynamicCache decode: an eager prefill, then DYNAMIC_STEPS compiled one-token steps (the second
    recompiles with a symbolic KV length, torch's automatic dynamic shapes; the third reuses it)."""
    encoder_decoder = matrix_kind(family) == "encoder-decoder"
    eager_cache, cache = _dynamic_cache(model, encoder_decoder), _dynamic_cache(model, encoder_decoder)
    ids = _ids(1, 7 if encoder_decoder else PROMPT)
    if encoder_decoder:
        encoder_outputs = model.get_encoder()(input_ids=ids)
        prompt = torch.full((1, 1), model.config.decoder_start_token_id)

        def step(fn, cache, token):
            return fn(encoder_outputs=encoder_outputs, decoder_input_ids=token, past_key_values=cache,
                      use_cache=True).logits
    else:
        prompt = ids

        def step(fn, cache, token):
            return fn(token, past_key_values=cache, use_cache=True).logits
    expected = step(model, eager_cache, prompt)
    pairs = [("prefill (eager both)", step(model, cache, prompt), expected)]
    compiled = torch.compile(model, backend=backend)
    for i in range(DYNAMIC_STEPS):
        token = expected[:, -1:].argmax(-1)
        expected = step(model, eager_cache, token)
        pairs.append((f"decode step {i + 1} logits", step(compiled, cache, token), expected))
    return _first_mismatch(pairs), None


def _ge(family, attn, scenario):
    from npu_attn_graph import to_ge_graph

    model = build_matrix_model(family, attn)
    args, kwargs = prefill_call(family, model) if scenario == "prefill" else static_decode_call(family, model)
    with tempfile.TemporaryDirectory(prefix="matrix_ge_") as out:
        return to_ge_graph(model, *args, out_dir=out, **kwargs)


@functools.cache
def run_case(family: str, attn: str, scenario: str, ge: bool = True) -> CaseResult:
    """Compile and run the case once (eager alongside), recording the report, graph breaks and
    recompiles (npu_attn_graph.backend.traced_afresh), numerics, and the GE graph of the prefill
    or of the static decode step."""
    start = time.perf_counter()
    threads = torch.get_num_threads()
    # Tiny models: one thread is twice as fast as two here (no OpenMP hand-offs per 64-wide matmul).
    torch.set_num_threads(1)
    try:
        result = _run_case(family, attn, scenario, ge)
    finally:
        torch.set_num_threads(threads)
    result.seconds = time.perf_counter() - start
    return result


def _run_case(family: str, attn: str, scenario: str, ge: bool) -> CaseResult:
    from npu_attn_graph import NpuAttnBackend
    from npu_attn_graph.backend import traced_afresh

    result = CaseResult(family, attn, scenario, report=Report())
    run = {"prefill": _run_prefill, "static": _run_static, "dynamic": _run_dynamic}[scenario]
    with torch.no_grad():
        model = build_matrix_model(family, attn)
        try:
            with traced_afresh(result.report):
                result.numerics, result.tokens_equal = run(family, model, NpuAttnBackend(report=result.report))
        except Exception as error:  # noqa: BLE001 - recorded; every test of the case then shows it
            result.error = f"{type(error).__name__}: {' '.join(str(error).split())[:500]}"
        finally:
            torch._dynamo.reset()
        if ge and scenario in ("prefill", "static"):
            try:
                result.ge = _ge(family, attn, scenario)
            except Exception as error:  # noqa: BLE001
                result.ge_error = f"{type(error).__name__}: {' '.join(str(error).split())[:500]}"
    return result


def _left_alone(report: Report | None, prefix: str = "") -> list[str]:
    if report is None:
        return []
    counts: dict[tuple[str, str], int] = {}
    for site in report.left_alone():
        key = (site.kind, site.reason or "(no reason given)")
        counts[key] = counts.get(key, 0) + 1
    return [f"{prefix}{n}x {kind}: {reason}" for (kind, reason), n in counts.items()]


def matrix_row(r: CaseResult) -> list[str]:
    """One markdown table row of a measured case."""
    report = r.report
    attention = [s for s in report.sites if s.kind == "attention"]
    writes = [s for s in report.sites if s.kind == "kv_update"]
    if r.error:
        equal = f"crash: {r.error[:160]}"
    elif r.scenario == "static":
        equal = "tokens yes" if r.tokens_equal else "tokens **no**"
        if r.tokens_equal and r.numerics:
            equal += f"; cache **differs** ({r.numerics[:80]})"
    else:
        equal = "yes" if r.numerics is None else f"**no** ({r.numerics[:80]})"
    if r.scenario == "dynamic":
        ge = "-"
    elif r.ge_error:
        ge = f"conversion failed: {r.ge_error[:120]}"
    elif r.ge is None:
        ge = "not converted"
    else:
        ge = (f"{r.ge.graph_count}, complete" if r.ge.single_graph else
              f"**{r.ge.graph_count}, {len(r.ge.unconverted)} unconverted node(s)**")
    want_attention, want_writes = expected_sites(r.family, r.scenario, report.graphs)

    def fused(sites, expected):
        text = f"{sum(s.rewritten for s in sites)}/{len(sites)}"
        return text if len(sites) == expected else f"{text} (**{expected - len(sites)} more not listed**)"

    reasons = _left_alone(report) + _left_alone(r.ge.report if r.ge is not None else None, "GE graph: ")
    return [r.family, r.attn, r.scenario, fused(attention, want_attention),
            fused(writes, want_writes) if want_writes else "-", equal, ge,
            str(len(report.graph_breaks)), str(len(report.recompiles)), "<br>".join(reasons) or "-"]


MATRIX_HEADER = ["family", "attn", "scenario", "attention fused/total", "KV writes fused/total", "equal to eager",
                 "GE graphs", "graph breaks", "recompiles", "sites left alone (reason)"]


def matrix_markdown(results: list[CaseResult]) -> str:
    lines = ["| " + " | ".join(MATRIX_HEADER) + " |", "|" + "---|" * len(MATRIX_HEADER)]
    for r in results:
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in matrix_row(r)) + " |")
    return "\n".join(lines)


SLIDING_FAMILIES = {  # name -> (config class, model class, attention, extra config)
    "mistral": ("MistralConfig", "MistralForCausalLM", "sdpa", {}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", "sdpa", {}),
    "gemma2-eager": ("Gemma2Config", "Gemma2ForCausalLM", "eager", {}),
    "gpt-oss-eager": ("GptOssConfig", "GptOssForCausalLM", "eager", {"num_local_experts": 4, "num_experts_per_tok": 2}),
}


def sliding_window_model(name: str, window: int) -> torch.nn.Module:
    """A tiny random 2-layer sliding-window model (tests of sliding-window caches)."""
    import transformers as T

    config_cls, model_cls, attn, extra = SLIDING_FAMILIES[name]
    torch.manual_seed(0)
    cfg = getattr(T, config_cls)(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                 max_position_embeddings=256, sliding_window=window, **extra)
    cfg._attn_implementation = attn
    return getattr(T, model_cls)(cfg).eval()


def static_decode_to_ge(model, ids: torch.Tensor, out_dir):
    """to_ge_graph of one StaticCache decode step after an eager prefill of `ids`."""
    from npu_attn_graph import to_ge_graph

    length = ids.shape[1]
    with torch.no_grad():
        cache = transformers.StaticCache(config=model.config, max_cache_len=32)
        token = model(ids, past_key_values=cache, use_cache=True, cache_position=torch.arange(length)).logits[:, -1:]
        return to_ge_graph(model, token.argmax(-1), past_key_values=cache, use_cache=True,
                           cache_position=torch.tensor([length]), out_dir=out_dir)
