"""An independent numpy transcription of Huginn's forward pass: the oracle for recurrent tests.

Written line by line from ``RavenForCausalLM.forward`` in ``recpre/raven_modeling_minimal.py``
(seal-rg/recurrent-pretraining), in float64 with plain loops and no shared code with
diptych's backends:

- ``RMSNorm``: ``x * rsqrt(mean(x^2) + eps) * weight``.
- ``CausalSelfAttention``: fused ``Wqkv`` split into [n_embd, kv*hd, kv*hd]; ``qk_bias[0]``
  added to q and ``qk_bias[1]`` to k BEFORE rotary; ``apply_rotary_emb_complex_like`` rotates
  interleaved pairs (x[2j], x[2j+1]) by angle pos * base^(-2j/hd); SDPA with scale 1/sqrt(hd),
  causal; ``proj``.
- ``GatedMLP``: ``fc`` output chunked in two halves [a, b]; ``proj(silu(a) * b)``.
- ``SandwichBlock``: ``x = norm_2(attn(norm_1(x)) + x); x = norm_4(mlp(norm_3(x)) + x)``.
- forward: ``wte`` lookup times ``embed_scale``; prelude blocks; state loop
  ``x = core_block(adapter(cat[x, e]))`` num_steps times; ``ln_f``; coda blocks; ``ln_f``;
  ``lm_head`` (= wte when tied).

Deviation on purpose: the reference ignores ``attention_mask``; this one takes an optional key
padding mask and derives positions from it (diptych's convention), which reduces to the
reference when there is no padding.
"""

from __future__ import annotations

import numpy as np


def rms_norm(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def rope_interleaved(x, pos, base):
    # x [B, S, H, D]; pairs (2j, 2j+1) rotated as a complex number by pos * inv_freq[j]
    d = x.shape[-1]
    inv = 1.0 / (base ** (np.arange(0, d, 2, dtype=np.float64) / d))
    ang = pos[..., None].astype(np.float64) * inv  # [B, S, D/2]
    cos, sin = np.cos(ang)[:, :, None, :], np.sin(ang)[:, :, None, :]
    re, im = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = re * cos - im * sin
    out[..., 1::2] = im * cos + re * sin
    return out


def attention(W, p, x, pos, key_mask, spec):
    B, S, E = x.shape
    nh, nkv, hd = spec.n_heads, spec.num_key_value_heads, spec.head_dim
    qkv = x @ W[p + "attn.Wqkv.weight"].T
    q = qkv[..., :E].reshape(B, S, nh, hd)
    k = qkv[..., E:E + nkv * hd].reshape(B, S, nkv, hd)
    v = qkv[..., E + nkv * hd:].reshape(B, S, nkv, hd)
    if spec.qk_bias:
        q = q + W[p + "attn.qk_bias"][0]
        k = k + W[p + "attn.qk_bias"][1]
    q, k = rope_interleaved(q, pos, spec.rope_base), rope_interleaved(k, pos, spec.rope_base)
    rep = nh // nkv
    y = np.zeros((B, S, nh, hd))
    for b in range(B):
        for h in range(nh):
            scores = q[b, :, h] @ k[b, :, h // rep].T / np.sqrt(hd)
            allowed = np.tril(np.ones((S, S), bool)) & key_mask[b][None, :].astype(bool)
            scores = np.where(allowed, scores, -np.inf)
            m = scores.max(-1, keepdims=True)
            m = np.where(np.isfinite(m), m, 0.0)
            e = np.where(allowed, np.exp(scores - m), 0.0)
            y[b, :, h] = (e / np.maximum(e.sum(-1, keepdims=True), 1e-300)) @ v[b, :, h // rep]
    return y.reshape(B, S, E) @ W[p + "attn.proj.weight"].T


def mlp(W, p, x):
    a, b = np.split(x @ W[p + "mlp.fc.weight"].T, 2, axis=-1)
    return (a / (1.0 + np.exp(-a)) * b) @ W[p + "mlp.proj.weight"].T


def sandwich(W, p, x, pos, key_mask, spec):
    eps = spec.norm_eps
    a = attention(W, p, rms_norm(x, W[p + "norm_1.weight"], eps), pos, key_mask, spec)
    x = rms_norm(a + x, W[p + "norm_2.weight"], eps)
    return rms_norm(mlp(W, p, rms_norm(x, W[p + "norm_3.weight"], eps)) + x, W[p + "norm_4.weight"], eps)


def huginn_forward(spec, weights, tokens, num_steps, init_state=None, attention_mask=None, return_state=False):
    """Logits [B, S, V] (float64) after ``num_steps`` core iterations from ``init_state`` (zeros if None)."""
    W = {k: np.asarray(v, np.float64) for k, v in weights.items()}
    tokens = np.asarray(tokens)
    mask = np.ones(tokens.shape, np.int64) if attention_mask is None else np.asarray(attention_mask)
    pos = np.clip(np.cumsum(mask, -1) - 1, 0, None)
    e = W["transformer.wte.weight"][tokens] * spec.embed_scale
    for i in range(spec.n_layers_in_prelude):
        e = sandwich(W, f"transformer.prelude.{i}.", e, pos, mask, spec)
    x = np.zeros_like(e) if init_state is None else np.asarray(init_state, np.float64)
    for _ in range(num_steps):
        x = np.concatenate([x, e], -1) @ W["transformer.adapter.weight"].T
        if "transformer.adapter.bias" in W:
            x = x + W["transformer.adapter.bias"]
        for i in range(spec.n_layers_in_recurrent_block):
            x = sandwich(W, f"transformer.core_block.{i}.", x, pos, mask, spec)
    state = x
    x = rms_norm(x, W["transformer.ln_f.weight"], spec.norm_eps)
    for i in range(spec.n_layers_in_coda):
        x = sandwich(W, f"transformer.coda.{i}.", x, pos, mask, spec)
    x = rms_norm(x, W["transformer.ln_f.weight"], spec.norm_eps)
    head = W["transformer.wte.weight"] if spec.tie_embeddings else W["lm_head.weight"]
    logits = x @ head.T
    return (logits, state) if return_state else logits


# -- cached decoding with per-token depths (the oracle for diptych's KV cache) ----------------------------------------
def _block_one(W, p, spec, x, pos, past):
    """One sandwich block on ONE position ``x`` [H] at RoPE position ``pos``, attending to ``past``
    (a list of (k, v) [kv_heads, head_dim] of earlier positions) and itself. Returns (out, (k, v))."""
    E, nh, nkv, hd = x.shape[0], spec.n_heads, spec.num_key_value_heads, spec.head_dim
    qkv = rms_norm(x, W[p + "norm_1.weight"], spec.norm_eps) @ W[p + "attn.Wqkv.weight"].T
    q, k, v = qkv[:E].reshape(nh, hd), qkv[E:E + nkv * hd].reshape(nkv, hd), qkv[E + nkv * hd:].reshape(nkv, hd)
    if spec.qk_bias:
        q, k = q + W[p + "attn.qk_bias"][0, 0], k + W[p + "attn.qk_bias"][1, 0]
    at = np.array([[pos]])
    q = rope_interleaved(q[None, None], at, spec.rope_base)[0, 0]
    k = rope_interleaved(k[None, None], at, spec.rope_base)[0, 0]
    keys = np.stack([pk for pk, _ in past] + [k])
    vals = np.stack([pv for _, pv in past] + [v])
    rep = nh // nkv
    y = np.zeros((nh, hd))
    for h in range(nh):
        s = keys[:, h // rep] @ q[h] / np.sqrt(hd)
        s = np.exp(s - s.max())
        y[h] = (s / s.sum()) @ vals[:, h // rep]
    x = rms_norm(y.reshape(E) @ W[p + "attn.proj.weight"].T + x, W[p + "norm_2.weight"], spec.norm_eps)
    x = rms_norm(mlp(W, p, rms_norm(x, W[p + "norm_3.weight"], spec.norm_eps)) + x, W[p + "norm_4.weight"],
                 spec.norm_eps)
    return x, (k, v)


def huginn_generate_latest(spec, weights, prompt, max_new, num_steps, *, depth_of=None, latent_diff=None,
                           warm_start=False, fallback="latest"):
    """Greedy decoding of ONE unpadded row, one position at a time (prompt included), float64.

    Every position keeps its own K/V per layer, and per core layer one entry per iteration it
    actually ran. Iteration i of a later token reads position j's entry at iteration
    ``min(i, depth_j)``: Huginn's "latest" fallback by construction (``fallback="full"`` instead
    keeps iterating an exited token for its K/V only, to show that the choice matters). Prompt
    positions and the first generated token run ``num_steps`` (no exit in prefill); token t >= 1
    exits at ``depth_of(t)``, or at the first iteration i >= 2 whose relative latent change
    ``|x_i - x_{i-1}| / |x_i|`` is below ``latent_diff``. ``warm_start``: a generated position
    starts from the previous position's final state instead of zeros.

    Returns (tokens [max_new], logits [max_new, V], depths [max_new]).
    """
    W = {k: np.asarray(v, np.float64) for k, v in weights.items()}
    n_pre, n_core, n_coda = spec.n_layers_in_prelude, spec.n_layers_in_recurrent_block, spec.n_layers_in_coda
    pre, coda = [[] for _ in range(n_pre)], [[] for _ in range(n_coda)]
    core = [[] for _ in range(n_core)]  # core[l][j] = [(k, v) at iteration 1, 2, ..., depth_j (or more if "full")]
    head = W["transformer.wte.weight"] if spec.tie_embeddings else W["lm_head.weight"]
    seq, toks, logits_out, depths = list(prompt), [], [], []
    prev_final = None
    for j in range(len(prompt) + max_new - 1):
        t = j - (len(prompt) - 1)  # the generated token these logits choose (< 0: inside the prompt)
        e = W["transformer.wte.weight"][seq[j]] * spec.embed_scale
        for layer in range(n_pre):
            e, kv = _block_one(W, f"transformer.prelude.{layer}.", spec, e, j, pre[layer])
            pre[layer].append(kv)
        x = prev_final if (warm_start and t >= 1) else np.zeros_like(e)
        mine = [[] for _ in range(n_core)]
        exit_state, depth = None, num_steps
        for i in range(1, num_steps + 1):
            xi = np.concatenate([x, e]) @ W["transformer.adapter.weight"].T
            if "transformer.adapter.bias" in W:
                xi = xi + W["transformer.adapter.bias"]
            for layer in range(n_core):
                past = [entries[min(i, len(entries)) - 1] for entries in core[layer]]
                xi, kv = _block_one(W, f"transformer.core_block.{layer}.", spec, xi, j, past)
                mine[layer].append(kv)
            if exit_state is None and t >= 1 and (
                    (depth_of is not None and i == depth_of(t))
                    or (latent_diff is not None and i >= 2
                        and np.linalg.norm(xi - x) / np.linalg.norm(xi) < latent_diff)):
                exit_state, depth = xi, i
                if fallback == "latest":
                    break
            x = xi
        x = x if exit_state is None else exit_state
        for layer in range(n_core):
            core[layer].append(mine[layer])
        prev_final = x
        h = rms_norm(x, W["transformer.ln_f.weight"], spec.norm_eps)
        for layer in range(n_coda):
            h, kv = _block_one(W, f"transformer.coda.{layer}.", spec, h, j, coda[layer])
            coda[layer].append(kv)
        logits = rms_norm(h, W["transformer.ln_f.weight"], spec.norm_eps) @ head.T
        if t >= 0:
            tok = int(np.argmax(logits[: spec.vocab_size]))
            toks.append(tok)
            logits_out.append(logits[: spec.vocab_size])
            depths.append(depth)
            seq.append(tok)
    return np.array(toks), np.array(logits_out), np.array(depths)
