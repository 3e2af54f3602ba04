"""RLTT-style latent-trajectory credit against plain GRPO on a small recurrent-depth model (issue 21, item 5).

One model with some skill is trained first and cached in ``OUT/pretrained``, so every arm starts from the same
weights. It is the ``recurrent_pretrain`` recipe's model and code (``train_model``: Huginn's depth schedule,
truncated backprop, every prefix's product supervised), at a small budget on ``word_problem`` with 2-8
factors. Then GRPO (``diptych.core.trainers.grpo.train_grpo``, the framework's own loop) trains it for the
same steps, prompts and samples in each arm:

* ``final``: plain GRPO, the reward credited to the final latent state only (``trajectory=None``);
* ``uniform`` / ``increasing``: RLTT's trajectory-weighted log-prob over the k differentiated iterations
  (``GRPOConfig.trajectory``, ``diptych.core.losses.trajectory``; docs/recurrent_research.md section 1).

The completion is the answer digit (one token); the reward is the task's verifier. Each seed changes the prompt
order and the sampling noise of GRPO; within a seed the arms see the same first rollout (the same weights, the
same sampling seed), so their first updates differ only by the credit. Reported per arm and seed: held-out
accuracy at several depths r before and after (argmax over the answer digits, zero initial state as GRPO
samples), on training lengths and on longer lists, the mean log-prob of the right answer read out after each
iteration (the depth profile), and the reward and ``iter_logprob_<i>`` curves the trainer logs.

    python -m diptych.recipes.rltt_vs_grpo --out runs/rltt_vs_grpo            # ~20 min on one core
    python -m diptych.recipes.rltt_vs_grpo --out /tmp/rltt --tiny             # seconds: a smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from diptych.core.backend import get_backend
from diptych.core.hf import load_hf_folder, save_hf_folder
from diptych.core.losses.trajectory import WEIGHTINGS, TrajectoryCredit
from diptych.core.metrics import MetricsLogger
from diptych.core.optim import OptimConfig
from diptych.core.recurrent_spec import RecurrentSpec, tiny_recurrent_spec
from diptych.core.tokenizer import CharTokenizer
from diptych.core.trainers.grpo import GRPOConfig, train_grpo
from diptych.recipes.recurrent_pretrain import TASKS, CharCodec, RecipeConfig, _encode, _ints, _task, train_model
from diptych.recurrent.schedule import DepthSchedule
from diptych.recurrent.sweep import score
from diptych.recurrent.training import DepthPolicy

TASK = "word_problem"
PRETRAINED = "pretrained"
META = "rltt_recipe.json"


class TokenizerCodec(CharCodec):
    """The recipe codec with :class:`CharTokenizer`'s ids, so the GRPO trainer samples and decodes the pretrained
    model with the stock tokenizer (id 0 is padding in both)."""

    def __init__(self, chars: str) -> None:
        super().__init__(chars)
        tok = CharTokenizer()
        self.index = {c: tok.encode(c)[0] for c in chars}
        self._vocab = tok.vocab_size

    @property
    def vocab_size(self) -> int:
        return self._vocab


@dataclass
class RLTTRecipeConfig:
    """Defaults fit ``seeds x arms`` GRPO runs plus the pretraining in about 20 minutes on one CPU core."""

    out: str = "runs/rltt_vs_grpo"
    backend: str = "torch"
    seeds: tuple[int, ...] = (0, 1, 2)
    arms: tuple[str, ...] = ("final", "uniform")
    alpha: float = 1.0  # exponent of the ``increasing`` weighting
    length: tuple[int, int] = (2, 8)  # factors in training and the held-out set
    long_length: tuple[int, int] = (9, 12)  # held-out lists longer than any seen
    width: int = 64
    pretrain_steps: int = 400
    pretrain_batch: int = 64
    pretrain_lr: float = 2e-3
    pretrain_seed: int = 0
    grpo_steps: int = 40
    prompts_per_step: int = 16
    group_size: int = 8
    lr: float = 1e-4
    depth: int = 8  # GRPO's sampling and training depth r (fixed)
    backprop_depth: int = 8  # k: iterations with gradient (k = r: RLTT's sum over every loop)
    eval_size: int = 512
    eval_depths: tuple[int, ...] = (1, 2, 4, 8, 16)
    threads: int = 1

    def __post_init__(self) -> None:
        bad = [a for a in self.arms if a not in WEIGHTINGS]
        if bad or not self.arms:
            raise ValueError(f"arms must be weightings from {', '.join(WEIGHTINGS)} ('final' is plain GRPO), "
                             f"got {list(self.arms)}.")
        if not 1 <= self.backprop_depth <= self.depth:
            raise ValueError(f"backprop_depth must be in 1..depth={self.depth}, got {self.backprop_depth}.")
        if self.depth not in self.eval_depths:
            raise ValueError(f"eval_depths {list(self.eval_depths)} must include the GRPO depth {self.depth}.")


def tiny_config(out: str) -> RLTTRecipeConfig:
    """A seconds-long run of every code path (tests, smoke checks); its numbers mean nothing."""
    return RLTTRecipeConfig(out=out, seeds=(0,), length=(2, 4), long_length=(5, 6), width=32, pretrain_steps=80,
                            pretrain_batch=32, grpo_steps=2, prompts_per_step=4, group_size=4, lr=1e-3, depth=3,
                            backprop_depth=3, eval_size=32, eval_depths=(1, 3))


def _set_threads(cfg: RLTTRecipeConfig) -> None:
    if cfg.backend == "torch" and cfg.threads > 0:
        import torch  # lazy: only the torch backend needs it

        torch.set_num_threads(cfg.threads)


def _no_grad(cfg: RLTTRecipeConfig) -> Any:
    if cfg.backend == "torch":
        import torch

        return torch.no_grad()
    return contextlib.nullcontext()


def _codec() -> TokenizerCodec:
    return TokenizerCodec(TASKS[TASK]["chars"])


def _pretrain_config(cfg: RLTTRecipeConfig) -> RecipeConfig:
    # The schedule is pinned (constant AdamW, no warmup) so a change of recurrent_pretrain's defaults does not
    # silently change this recipe's start (and its cache key).
    return RecipeConfig(task=TASK, backend=cfg.backend, steps=cfg.pretrain_steps, batch=cfg.pretrain_batch,
                        lr=cfg.pretrain_lr, lr_schedule="constant", warmup=0, min_lr_ratio=0.0, clip=1.0,
                        mean_recurrence=cfg.depth, backprop_depth=min(4, cfg.depth),
                        length=cfg.length, seed=cfg.pretrain_seed, baseline=False, width=cfg.width,
                        threads=cfg.threads, out=str(Path(cfg.out) / PRETRAINED))


def recipe_spec(cfg: RLTTRecipeConfig) -> RecurrentSpec:
    """The ``recurrent_pretrain`` model (prelude 1, core block 2, coda 1) over CharTokenizer's vocabulary."""
    longest = 4 + cfg.long_length[1] + 1  # "mul " + factors + "="
    return tiny_recurrent_spec(vocab_size=_codec().vocab_size, mean_recurrence=cfg.depth,
                               mean_backprop_depth=min(4, cfg.depth), block_size=max(64, 2 * longest),
                               n_embd=cfg.width, intermediate_size=2 * cfg.width, n_layers_in_recurrent_block=2)


def pretrained(cfg: RLTTRecipeConfig, log: Any = print) -> tuple[RecurrentSpec, dict[str, np.ndarray], dict[str, Any]]:
    """The shared starting point: trained once and cached in ``OUT/pretrained`` (reused while its recipe, the
    ``recurrent_pretrain`` config, is unchanged)."""
    pcfg = _pretrain_config(cfg)
    folder = Path(cfg.out) / PRETRAINED
    key = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(pcfg).items() if k != "out"}
    meta_path = folder / META
    if meta_path.is_file() and json.loads(meta_path.read_text()).get("recipe") == key:
        spec, weights = load_hf_folder(folder)
        meta = json.loads(meta_path.read_text())
        log(f"pretrained model reused from {folder} ({meta['train_seconds']:.0f}s when trained)")
        return spec, weights, {**meta, "cached": True}
    spec = recipe_spec(cfg)
    log(f"pretraining the shared start: {spec.num_params()} parameters, {pcfg.steps} steps, {pcfg.length} factors")
    t0 = time.perf_counter()
    model, rb, losses = train_model(pcfg, spec, DepthSchedule(pcfg.mean_recurrence, pcfg.backprop_depth,
                                                              sigma=pcfg.sigma, seed=pcfg.seed), _codec(), log)
    weights = rb.export(model)
    meta = {"recipe": key, "train_seconds": time.perf_counter() - t0, "final_loss": float(np.mean(losses[-50:])),
            "params": spec.num_params()}
    save_hf_folder(folder, spec, weights, extra_files={META: json.dumps(meta, indent=2) + "\n"})
    return spec, weights, {**meta, "cached": False}


def held_out(cfg: RLTTRecipeConfig) -> dict[str, tuple[np.ndarray, ...]]:
    """The held-out sets every model is scored on (the same problems before and after, in every arm)."""
    codec, out = _codec(), {}
    for name, length, seed in (("train_lengths", cfg.length, 7), ("longer", cfg.long_length, 8)):
        rows = _task(_pretrain_config(cfg), length).generate("test", cfg.eval_size, seed=seed)
        tokens, mask, _, _, answers = _encode(codec, rows)
        out[name] = (tokens, mask, answers)
    return out


def evaluate(cfg: RLTTRecipeConfig, model: Any, sets: dict[str, tuple[np.ndarray, ...]]) -> dict[str, Any]:
    """Accuracy at each fixed depth (zero initial state, as GRPO samples), and the depth profile: the mean log-prob
    of the right answer read out after iteration 1 .. max(eval_depths), on the training-length set."""
    rb = importlib.import_module(f"diptych.backends.{cfg.backend}.recurrent")
    codec = _codec()
    answer_ids = [codec.index[c] for c in TASKS[TASK]["answers"]]
    ops = rb._Ops(model)
    res: dict[str, Any] = {}
    for name, (tokens, mask, answers) in sets.items():
        res[f"accuracy_{name}"] = {str(r): score(ops, tokens, mask, answers, answer_ids, num_steps=r,
                                                 init_scale=0.0)["accuracy"] for r in cfg.eval_depths}
    tokens, mask, answers = sets["train_lengths"]
    targets = np.zeros_like(tokens)
    targets[:, -1] = answers
    r = max(cfg.eval_depths)
    with _no_grad(cfg):
        lps = np.asarray(get_backend(cfg.backend).to_numpy(
            rb.iteration_logprobs(model, tokens, mask, targets, num_steps=r, num_grad_steps=r)))
    res["answer_logprob_by_iteration"] = [float(x) for x in lps[:, :, -1].mean(0)]
    return res


def grpo_config(cfg: RLTTRecipeConfig, seed: int, trajectory: TrajectoryCredit | None, steps: int | None = None
                ) -> GRPOConfig:
    """The same GRPO run for every arm; only ``trajectory`` differs. One-token completions (the answer digit)."""
    return GRPOConfig(steps=cfg.grpo_steps if steps is None else steps, prompts_per_step=cfg.prompts_per_step,
                      num_generations=cfg.group_size, max_prompt_length=4 + cfg.length[1] + 1,
                      max_completion_length=1, loss_type="dapo", seed=seed, optim=OptimConfig(lr=cfg.lr),
                      depth=DepthPolicy(DepthSchedule(cfg.depth, cfg.backprop_depth, mode="fixed"),
                                        sample_steps=cfg.depth),
                      trajectory=trajectory)


def arm_trajectory(cfg: RLTTRecipeConfig, arm: str) -> TrajectoryCredit | None:
    """``final`` is plain GRPO (no trajectory credit at all); the others RLTT's weightings."""
    return None if arm == "final" else TrajectoryCredit(arm, alpha=cfg.alpha)


def train_arm(cfg: RLTTRecipeConfig, spec: RecurrentSpec, weights: dict[str, np.ndarray], seed: int,
              trajectory: TrajectoryCredit | None, steps: int | None = None) -> tuple[Any, list[dict[str, float]]]:
    """GRPO from the shared weights; returns the final train state and the logged metrics per step."""
    backend = get_backend(cfg.backend)
    gcfg = grpo_config(cfg, seed, trajectory, steps)
    rows = _task(_pretrain_config(cfg)).generate("train", gcfg.steps * cfg.prompts_per_step, seed=1000 + seed)
    state = backend.init_train_state(backend.build(spec, weights), gcfg.optim)
    logger = MetricsLogger()
    state = train_grpo(backend, state, CharTokenizer(), _task(_pretrain_config(cfg)), rows, gcfg, logger)
    return state, logger.history


def _summary(cfg: RLTTRecipeConfig, before: dict[str, Any], runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Mean and spread over seeds of each arm's accuracy, and each RLTT arm minus plain GRPO seed by seed."""
    out: dict[str, Any] = {"before": {k: before[k] for k in before if k.startswith("accuracy")}}
    for arm in cfg.arms:
        per = [runs[str(s)][arm] for s in cfg.seeds]
        arm_out: dict[str, Any] = {}
        for name in ("train_lengths", "longer"):
            for r in cfg.eval_depths:
                accs = [p[f"accuracy_{name}"][str(r)] for p in per]
                arm_out[f"{name}_r{r}"] = {"mean": float(np.mean(accs)), "std": float(np.std(accs)),
                                           "per_seed": accs}
        arm_out["final_reward_mean"] = float(np.mean([np.mean(p["reward"][-5:]) for p in per]))
        out[arm] = arm_out
    if "final" in cfg.arms:
        for arm in cfg.arms:
            if arm == "final":
                continue
            diffs = {}
            for name in ("train_lengths", "longer"):
                for r in cfg.eval_depths:
                    key = f"accuracy_{name}"
                    d = [runs[str(s)][arm][key][str(r)] - runs[str(s)]["final"][key][str(r)] for s in cfg.seeds]
                    diffs[f"{name}_r{r}"] = {"mean": float(np.mean(d)), "per_seed": d}
            out[f"{arm}_minus_final"] = diffs
    return out


def run(cfg: RLTTRecipeConfig, log: Any = print) -> dict[str, Any]:
    """Pretrain (or reuse), score, run every (seed, arm), score again; writes ``OUT/results.json``."""
    _set_threads(cfg)
    t_start = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    spec, weights, pre = pretrained(cfg, log)
    backend = get_backend(cfg.backend)
    sets = held_out(cfg)
    before = evaluate(cfg, backend.build(spec, weights), sets)
    log(f"before GRPO: {before['accuracy_train_lengths']} (longer lists {before['accuracy_longer']})")
    runs: dict[str, dict[str, Any]] = {}
    for seed in cfg.seeds:
        runs[str(seed)] = {}
        for arm in cfg.arms:
            t0 = time.perf_counter()
            state, history = train_arm(cfg, spec, weights, seed, arm_trajectory(cfg, arm))
            seconds = time.perf_counter() - t0
            res = evaluate(cfg, state.model, sets)
            iters = sorted({k for h in history for k in h if k.startswith("iter_logprob_")},
                           key=lambda k: int(k.rsplit("_", 1)[1]))
            res.update(train_seconds=seconds, reward=[h["reward"] for h in history],
                       trainer_iter_logprob={k: [h[k] for h in history] for k in iters})
            runs[str(seed)][arm] = res
            log(f"seed {seed} {arm:>10s}: {res['accuracy_train_lengths']} (longer {res['accuracy_longer']}), "
                f"reward {np.mean(res['reward'][:5]):.3f} -> {np.mean(res['reward'][-5:]):.3f}, {seconds:.0f}s")
    results = {"config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
               "pretrained": pre, "params": spec.num_params(), "before": before, "runs": runs,
               "summary": _summary(cfg, before, runs), "wall_seconds": time.perf_counter() - t_start}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def _words(text: str) -> tuple[str, ...]:
    return tuple(w for w in text.split(",") if w)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = RLTTRecipeConfig()
    p.add_argument("--out", default=d.out)
    p.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (tests)")
    p.add_argument("--backend", default=d.backend, choices=("torch", "jax"))
    p.add_argument("--seeds", type=_ints, default=None, help=f"GRPO seeds (default {','.join(map(str, d.seeds))})")
    p.add_argument("--arms", type=_words, default=None,
                   help=f"weightings from {','.join(WEIGHTINGS)}; final = plain GRPO (default final,uniform)")
    p.add_argument("--grpo-steps", type=int, default=None)
    p.add_argument("--pretrain-steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help="GRPO learning rate")
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads (0: torch's default)")
    p.add_argument("--json", type=Path, default=None,
                   help="also write the summary with the command, load average and wall time here")
    a = p.parse_args(argv)
    cfg = tiny_config(a.out) if a.tiny else RLTTRecipeConfig(out=a.out)
    over = {k: v for k, v in (("seeds", a.seeds), ("arms", a.arms), ("grpo_steps", a.grpo_steps),
                              ("pretrain_steps", a.pretrain_steps), ("lr", a.lr)) if v is not None}
    try:
        cfg = dataclasses.replace(cfg, backend=a.backend, threads=a.threads, **over)
    except ValueError as e:
        p.error(str(e))
    load0 = os.getloadavg()
    res = run(cfg)
    if a.json is not None:
        args = sys.argv[1:] if argv is None else argv
        record = {"command": "python -m diptych.recipes.rltt_vs_grpo " + " ".join(args), "seeds": list(cfg.seeds),
                  "load_average_start": list(load0), "load_average_end": list(os.getloadavg()),
                  "wall_seconds": res["wall_seconds"], "config": res["config"], "pretrained": res["pretrained"],
                  "summary": res["summary"],
                  "runs": {s: {arm: {k: v for k, v in r.items() if k != "trainer_iter_logprob"}
                               | {"trainer_iter_logprob_last": {k: v[-1] for k, v in r["trainer_iter_logprob"].items()}}
                               for arm, r in arms.items()} for s, arms in res["runs"].items()},
                  "before": res["before"]}
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
