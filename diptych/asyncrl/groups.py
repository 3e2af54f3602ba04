"""What travels between the roles: whole groups (one prompt's ``num_generations`` completions) with per-token
weight versions and behaviour log-probs, already laid out as the policy loss's fixed-width arrays.

A group's arrays are the rows of :func:`diptych.core.trainers.base.rollout_batch` (prompt left-padded to
``max_prompt_length``, completion right-padded to ``max_completion_length``), so a batch assembled from
groups is, row for row, the batch the synchronous loop builds from one rollout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from diptych.core.sampling import Rollout
from diptych.core.trainers.base import rollout_batch

ARRAY_KEYS = ("tokens", "attention_mask", "mask", "sampler_logprobs", "versions")


@dataclass
class Group:
    """One prompt's completions. ``versions`` is int64 ``[G, T - 1]`` aligned with ``mask`` (-1 off the mask)."""

    index: int
    """Global position in the stream of prompts (``step * prompts_per_step + i``): the trainer's order."""
    step: int
    """The step whose prompts it came from (``batch_iterator`` position)."""
    row: dict[str, Any]
    arrays: dict[str, np.ndarray]
    completions: list[list[int]]
    truncated: np.ndarray
    rewards: np.ndarray | None = None
    components: dict[str, float] = field(default_factory=dict)

    @property
    def oldest(self) -> int:
        """The oldest weight version any of its tokens was sampled with."""
        v = self.arrays["versions"][self.arrays["mask"] > 0]
        return int(v.min()) if v.size else 0

    @property
    def tokens(self) -> int:
        return int(self.arrays["mask"].sum())


@dataclass
class GeneratedBatch:
    """What a generator returns for one job: groups plus how it spent its time since the last one."""

    groups: list[Group]
    busy_s: float = 0.0
    idle_s: float = 0.0


def groups_from_rollout(rollout: Rollout, rows: Sequence[dict[str, Any]], step: int, first_index: int,
                        version: int, max_prompt_length: int, g: int) -> list[Group]:
    """Split a synchronous rollout (row ``i * g + j``) into groups; every token carries ``version``."""
    arrays = rollout_batch(rollout, max_prompt_length)
    arrays["versions"] = np.where(arrays["mask"] > 0, np.int64(version), np.int64(-1))
    comps = rollout.completions()
    out = []
    for i, row in enumerate(rows):
        sl = slice(i * g, (i + 1) * g)
        out.append(Group(index=first_index + i, step=step, row=dict(row),
                         arrays={k: np.ascontiguousarray(v[sl]) for k, v in arrays.items()},
                         completions=comps[sl], truncated=np.asarray(rollout.truncated[sl], bool)))
    return out


def group_from_finished(finished: Sequence[Any], row: dict[str, Any], index: int, step: int, max_prompt_length: int,
                        max_completion_length: int, pad_id: int) -> Group:
    """A group from the continuous sampler's ``Finished`` records (one per completion, in sample order)."""
    g = len(finished)
    width = max_prompt_length + max_completion_length
    tokens = np.full((g, width), pad_id, np.int32)
    attn = np.zeros((g, width), np.int32)
    mask = np.zeros((g, width - 1), np.float32)
    lp = np.zeros((g, width - 1), np.float32)
    versions = np.full((g, width - 1), -1, np.int64)
    for r, f in enumerate(finished):
        p, n = len(f.prompt_ids), len(f.tokens)
        tokens[r, max_prompt_length - p:max_prompt_length] = f.prompt_ids
        tokens[r, max_prompt_length:max_prompt_length + n] = f.tokens
        attn[r, max_prompt_length - p:max_prompt_length + n] = 1
        on = slice(max_prompt_length - 1, max_prompt_length - 1 + n)
        mask[r, on] = 1.0
        lp[r, on] = f.logprobs
        versions[r, on] = f.versions
    return Group(index=index, step=step, row=dict(row),
                 arrays={"tokens": tokens, "attention_mask": attn, "mask": mask, "sampler_logprobs": lp,
                         "versions": versions},
                 completions=[[int(t) for t in f.tokens] for f in finished],
                 truncated=np.asarray([bool(f.truncated) for f in finished]))


def assemble(groups: Sequence[Group]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Stack groups (in index order) into one batch of the policy-loss arrays, and their rewards."""
    groups = sorted(groups, key=lambda gr: gr.index)
    batch = {k: np.concatenate([gr.arrays[k] for gr in groups]) for k in ARRAY_KEYS}
    rewards = np.concatenate([np.asarray(gr.rewards, np.float32) for gr in groups])
    return batch, rewards
