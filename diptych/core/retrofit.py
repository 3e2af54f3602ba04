"""Retrofitting recurrence into a pretrained decoder (McLeish et al., arXiv 2511.07384), in numpy.

A Llama or Qwen2 decoder of ``n`` layers becomes a Huginn-format recurrent-depth model: the first ``prelude``
layers are the prelude, the last ``coda`` layers the coda, and the ``core`` layers just before the coda
initialise the looped core block (layers between the prelude and the core are dropped when
``prelude + core + coda < n``). The input-injection adapter starts as ``[I, I]`` on ``[state, embedding]``:
with Huginn's zero initial state one iteration feeds the core exactly the prelude's output, as the source
model does, and later iterations add the re-injected embedding to the state (a residual recurrence).

What carries over exactly: the embedding (``embed_scale = 1``, where Huginn scales by ``sqrt(n_embd)``), every
projection (q/k rows permuted per head from Llama's half-split rotary layout to Huginn's interleaved pairs, the
gate and up projections stacked into Huginn's ``fc``), the pre-attention and pre-MLP norms, the final norm and
the head. What cannot: Huginn's block is a *sandwich* (``x = n2(x + attn(n1(x))); x = n4(x + mlp(n3(x)))``),
so the residual stream is RMS-normalised after every sub-layer where Llama's grows freely, and Huginn applies
``ln_f`` (shared weight) after the recurrence as well as after the coda. The new norms start at one; the
reproduction at r = 1 is therefore approximate and the gap depends on how far the source's stream is from unit
RMS. ``tests/recurrent/test_retrofit.py`` measures it on a random-init source (mean KL 0.009 nats a token); on
a *trained* source it is far larger (1.57 nats on the retrofit-curriculum recipe's trained tiny Llama, where
accuracy drops to chance until the retrofitted model trains: ``diptych/recipes/RESEARCH_RECIPES.md``), which is
why McLeish et al. train after retrofitting.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from diptych.core.recurrent_spec import RecurrentSpec
from diptych.core.spec import SpecError

SUPPORTED = ("llama", "qwen2")
"""Source model types: the decoder families whose blocks map onto Huginn's sandwich block."""


class RetrofitError(SpecError):
    """A source model or a split that cannot be retrofitted, with what to change."""


def core_layers(n_layers: int, prelude: int, core: int, coda: int) -> tuple[list[int], list[int], list[int]]:
    """Source layer indices of the prelude, the core block and the coda."""
    for name, v, lo in (("prelude", prelude, 0), ("core", core, 1), ("coda", coda, 0)):
        if int(v) < lo:
            raise RetrofitError(f"--{name} must be >= {lo}, got {v}.")
    if prelude + core + coda > n_layers:
        raise RetrofitError(f"prelude {prelude} + core {core} + coda {coda} = {prelude + core + coda} layers, but the "
                            f"source model has {n_layers}; choose a split of at most {n_layers} layers.")
    return (list(range(prelude)), list(range(n_layers - coda - core, n_layers - coda)),
            list(range(n_layers - coda, n_layers)))


def _interleave_rows(w: np.ndarray, heads: int, head_dim: int) -> np.ndarray:
    """Per head, rows (j, j + hd/2) of Llama's half-split rotary layout to rows (2j, 2j + 1) of Huginn's."""
    half = head_dim // 2
    perm = np.stack([np.arange(half), np.arange(half) + half], axis=1).reshape(-1)
    return w.reshape(heads, head_dim, *w.shape[1:])[:, perm].reshape(w.shape)


def retrofit_spec(src: Any, prelude: int, core: int, coda: int, mean_recurrence: int = 4,
                  mean_backprop_depth: int | None = None) -> RecurrentSpec:
    """The Huginn spec of the retrofitted model (``src`` is a ``DecoderSpec``)."""
    mt = getattr(src, "model_type", None)
    if getattr(src, "qk_norm", False):
        raise RetrofitError(f"the source ({mt}) has per-head q/k norms, which Huginn's attention lacks; retrofit "
                            f"reads {', '.join(SUPPORTED)} checkpoints.")
    if mt not in SUPPORTED:
        raise RetrofitError(f"retrofit reads {', '.join(SUPPORTED)} checkpoints, got model_type {mt!r}.")
    if getattr(src, "rope_type", "default") != "default" or getattr(src, "sliding_window", None) \
            or getattr(src, "no_rope_layers", None):
        raise RetrofitError("the source uses rope scaling, a sliding window or NoPE layers; Huginn has plain rotary "
                            "attention over the whole context.")
    h, nh = src.hidden_size, src.num_attention_heads
    if src.head_dim * nh != h:
        raise RetrofitError(f"head_dim {src.head_dim} x {nh} heads != hidden_size {h}; Huginn derives head_dim "
                            "as hidden_size / heads.")
    core_layers(src.num_hidden_layers, prelude, core, coda)
    nkv = src.num_key_value_heads
    return RecurrentSpec(
        n_embd=h, n_heads=nh, num_key_value_heads=nkv, intermediate_size=src.intermediate_size,
        vocab_size=src.vocab_size, padded_vocab_size=src.vocab_size, n_layers_in_prelude=prelude,
        n_layers_in_recurrent_block=core, n_layers_in_coda=coda, mean_recurrence=mean_recurrence,
        mean_backprop_depth=mean_backprop_depth or max(1, mean_recurrence // 2), norm_eps=src.rms_norm_eps,
        rope_base=src.rope_theta, block_size=src.max_position_embeddings,
        qk_bias=bool(src.attention_bias) and nkv == nh, bias=False, tie_embeddings=src.tie_word_embeddings,
        init_values={"embed_scale": 1.0}, bos_token_id=src.bos_token_id, eos_token_id=src.eos_token_id,
        pad_token_id=src.pad_token_id)


def retrofit(src: Any, weights: dict[str, np.ndarray], prelude: int, core: int, coda: int, *,
             mean_recurrence: int = 4, mean_backprop_depth: int | None = None,
             state_weight: float = 1.0) -> tuple[RecurrentSpec, dict[str, np.ndarray]]:
    """``(spec, Huginn weights)`` from a decoder's ``(spec, canonical weights)``; see the module docstring.

    ``state_weight`` scales the adapter's state half (``[state_weight * I, I]``): any value keeps r = 1 as it is
    (the initial state is zero); 0 makes every iteration repeat the first.
    """
    spec = retrofit_spec(src, prelude, core, coda, mean_recurrence, mean_backprop_depth)
    h, nh, nkv, hd = spec.n_embd, spec.n_heads, spec.num_key_value_heads, spec.head_dim
    pre, mid, post = core_layers(src.num_hidden_layers, prelude, core, coda)
    w = {k: np.asarray(v, np.float32) for k, v in weights.items()}
    out: dict[str, np.ndarray] = {"transformer.wte.weight": w["model.embed_tokens.weight"]}
    dropped_bias = []
    for part, layers in (("prelude", pre), ("core_block", mid), ("coda", post)):
        for j, layer in enumerate(layers):
            s, d = f"model.layers.{layer}.", f"transformer.{part}.{j}."
            q = _interleave_rows(w[s + "self_attn.q_proj.weight"], nh, hd)
            k = _interleave_rows(w[s + "self_attn.k_proj.weight"], nkv, hd)
            out[d + "attn.Wqkv.weight"] = np.concatenate([q, k, w[s + "self_attn.v_proj.weight"]], axis=0)
            if spec.qk_bias:
                qb = _interleave_rows(w[s + "self_attn.q_proj.bias"][:, None], nh, hd)[:, 0]
                kb = _interleave_rows(w[s + "self_attn.k_proj.bias"][:, None], nkv, hd)[:, 0]
                out[d + "attn.qk_bias"] = np.stack([qb.reshape(1, nh, hd), kb.reshape(1, nkv, hd)])
            for b in ("q_proj", "k_proj", "v_proj", "o_proj"):
                key = s + f"self_attn.{b}.bias"
                if key in w and (not spec.qk_bias or b in ("v_proj", "o_proj")) and np.any(w[key]):
                    dropped_bias.append(key)
            out[d + "attn.proj.weight"] = w[s + "self_attn.o_proj.weight"]
            out[d + "mlp.fc.weight"] = np.concatenate([w[s + "mlp.gate_proj.weight"], w[s + "mlp.up_proj.weight"]])
            out[d + "mlp.proj.weight"] = w[s + "mlp.down_proj.weight"]
            out[d + "norm_1.weight"] = w[s + "input_layernorm.weight"]
            out[d + "norm_3.weight"] = w[s + "post_attention_layernorm.weight"]
            out[d + "norm_2.weight"] = np.ones(h, np.float32)
            out[d + "norm_4.weight"] = np.ones(h, np.float32)
    eye = np.eye(h, dtype=np.float32)
    out["transformer.adapter.weight"] = np.concatenate([np.float32(state_weight) * eye, eye], axis=1)
    out["transformer.ln_f.weight"] = w["model.norm.weight"]
    if not spec.tie_embeddings:
        out["lm_head.weight"] = w["lm_head.weight"]
    if dropped_bias:
        warnings.warn(f"Huginn's attention has no v / o biases (and q / k biases only without grouped kv heads): "
                      f"{len(dropped_bias)} non-zero biases dropped (first: {dropped_bias[0]}); the retrofitted model "
                      "needs training to recover them.", stacklevel=2)
    spec.validate_weights(out)
    return spec, out
