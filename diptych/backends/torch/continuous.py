"""The torch half of the continuous-batching sampler: a KV cache of fixed slots, one row per request.

Each row keeps its tokens at the slots of their positions (slot ``j`` holds position ``j``), so rows of
different lengths decode side by side and a new prompt can enter a free row between decode steps.
``Decoder.run`` writes a step's k/v at one slot for the whole batch; a per-row write position is
had without touching the model's code by letting every row write at a shared scratch slot (the
cache's last) that each row's own mask admits, then moving that k/v to the row's position. The
attention mask is built here, per row, so Mistral's sliding window counts each row's own positions.
Token choice happens on the host (:mod:`diptych.rollout.continuous`); this module only returns
logits. ``diptych.backends.jax.continuous`` is the same text in JAX.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F

from diptych.backends.torch import lora
from diptych.backends.torch import model as M


class SlotDecoder:
    """A private copy of the model plus ``slots`` rows of KV cache, ``max_len`` positions each.

    The copy matters: a torch train state updates its module in place, and the sampler must keep the
    weights of the version it was told about until :meth:`load_weights` says otherwise. A LoRA model is
    copied as a plain one holding its merged weights, the form ``export_weights`` hands to :meth:`load_weights`.
    """

    def __init__(self, model: M.Decoder, slots: int, max_len: int) -> None:
        if lora.lora_config(model) is not None:
            device = next(model.parameters()).device
            model = M.build(model.spec, lora.merged_weights(model), model.dtype, model.kernels, device=device)
        else:
            model = copy.deepcopy(model)
        self.model = model.eval()
        self.slots, self.max_len = int(slots), int(max_len)
        self.device = M.lm_head_weight(self.model).device
        with torch.no_grad():
            self.cache = M.init_cache(self.model, self.slots, self.max_len + 1)  # + the scratch slot
        self._rows = torch.arange(self.slots, device=self.device)
        self._keys = torch.arange(self.max_len + 1, device=self.device)

    @torch.no_grad()
    def prefill(self, row: int, ids: np.ndarray, width: int) -> np.ndarray:
        """Write row ``row``'s k/v for ``ids`` at slots ``0..len(ids)-1``; the last position's logits ``[V]``.

        ``ids`` is right-padded to ``width`` (a fixed width, so a compiled twin sees one shape); pad
        positions repeat the last real one, so dynamic RoPE sees the same largest position as an unpadded run.
        """
        n = len(ids)
        tok = torch.zeros((1, width), dtype=torch.long, device=self.device)
        tok[0, :n] = torch.from_numpy(np.asarray(ids, np.int64)).to(self.device)
        q = torch.arange(width, device=self.device)
        positions = q.clamp(max=n - 1)[None]
        allowed = M.causal_allowed(q, self._keys, torch.ones((1, self.max_len + 1), dtype=torch.bool,
                                                             device=self.device), self.model.spec.sliding_window)
        view = M.KVCache(self.cache.k[:, row: row + 1], self.cache.v[:, row: row + 1])  # writes land in the cache
        hidden = self.model.run(tok, positions, allowed, view, 0)
        return F.linear(hidden[0, n - 1], M.lm_head_weight(self.model)).float().cpu().numpy()

    @torch.no_grad()
    def copy_row(self, src: int, dst: int) -> None:
        """Row ``dst``'s cache becomes row ``src``'s (a prompt prefilled once serves its repeats)."""
        self.cache.k[:, dst] = self.cache.k[:, src]
        self.cache.v[:, dst] = self.cache.v[:, src]

    @torch.no_grad()
    def decode(self, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Feed ``tokens[r]`` at position ``lengths[r]`` of every row; next-token logits ``[slots, V]``.

        Row ``r`` attends to its slots ``< lengths[r]`` (within the sliding window) and to itself at the
        scratch slot; its new k/v then move to slot ``lengths[r]``. Free rows compute harmless garbage.
        """
        tok = torch.from_numpy(np.asarray(tokens, np.int64)).to(self.device)[:, None]
        lengths_t = torch.from_numpy(np.asarray(lengths, np.int64)).to(self.device)
        scratch = self.max_len
        ok = self._keys[None, :] < lengths_t[:, None]
        window = self.model.spec.sliding_window
        if window is not None:
            ok &= self._keys[None, :] > lengths_t[:, None] - window
        ok |= self._keys[None, :] == scratch
        hidden = self.model.run(tok, lengths_t[:, None], ok[:, None, :], self.cache, scratch)
        logits = F.linear(hidden[:, 0], M.lm_head_weight(self.model)).float()
        for buf in (self.cache.k, self.cache.v):  # [layers, rows, kv_heads, slots, head_dim]
            buf.permute(1, 3, 0, 2, 4)[self._rows, lengths_t] = buf[:, :, :, scratch].permute(1, 0, 2, 3)
        return logits.cpu().numpy()

    @torch.no_grad()
    def load_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Copy canonical weights into the private model in place (the cache is left as it is)."""
        params = self.model.state_dict()
        unknown = sorted(set(weights) - set(params))
        missing = sorted(set(params) - set(weights))
        if unknown or missing:
            raise ValueError(f"update_weights needs exactly the model's canonical weights; unknown names "
                             f"{unknown[:3]}, missing names {missing[:3]}. Pass backend.export_weights(state) of "
                             "this model.")
        for name, value in weights.items():  # every check before the first copy: a refusal changes nothing
            if tuple(np.shape(value)) != tuple(params[name].shape):
                raise ValueError(f"weight {name} has shape {tuple(np.shape(value))}, the model's is "
                                 f"{tuple(params[name].shape)}.")
        for name, value in weights.items():
            params[name].copy_(torch.from_numpy(np.asarray(value, np.float32)))
