"""Peak training memory and step time: full fine-tuning vs LoRA r=16 vs QLoRA (NF4 base), and GRPO's reference.

    python benchmarks/lora_memory.py                                  # hidden 1024, 8 layers, vocab 32k, seq 512
    python benchmarks/lora_memory.py --shape tiny --allow-noisy       # a smoke run
    python benchmarks/lora_memory.py --backend torch --json benchmarks/results/lora_memory_cpu.json

Every case runs in a fresh subprocess (nothing else shares its memory) and reports:

- ``train_peak_bytes``: the process's peak resident set during the timed train steps, minus its resident set
  after the imports and before any weight exists. The kernel's high-water mark is reset
  (``/proc/self/clear_refs``) after the model, train state and a warm-up step exist and the numpy init weights are
  freed, then read (``VmHWM``) after the timed steps: what training holds plus what a step allocates
  (activations, gradients, the optimizer update). Where ``clear_refs`` is refused it falls back to
  ``ru_maxrss`` (the whole life of the process; the JSON names the method).
- the bytes read from the tensors themselves. torch: ``model_bytes`` (every parameter and buffer, NF4 codes and
  scales included), ``grad_bytes`` (the ``.grad`` tensors the optimizer steps on, read inside ``optimizer.step``),
  ``optimizer_bytes`` (AdamW's state tensors). JAX: ``trainable_bytes`` (the ``nnx.Param`` master weights),
  ``frozen_bytes`` (the rest of the module: the frozen base), ``optimizer_bytes`` (optax state leaves) and
  ``live_array_bytes`` (``jax.live_arrays()`` after the steps).
- ``base_bytes``: the targeted linears' frozen base as stored (NF4 packed or dense; ``lora.nbytes``) against
  ``bf16_bytes``, the same weights in bfloat16.
- ``seconds``: wall time of one train step (mean of ``--steps`` timed steps after a warm-up step).

GRPO's reference (``--grpo``, on by default): one policy-loss step with beta = 0 and with beta > 0 per mode, the
reference built by the trainers' own rule (``Trainer.reference_model``: a rebuilt copy under full fine-tuning, the
policy with adapters off under LoRA); ``live_bytes`` counts every tensor alive after the step (torch: unique
storages found by the garbage collector; JAX: ``jax.live_arrays()``). With LoRA beta > 0 must cost nothing more.

Targets (issue 19): LoRA's peak at most 40% of full fine-tuning's; the NF4 base at most 30% of its bf16 bytes;
GRPO with LoRA holds no reference copy. The discipline of ``benchmarks/discipline.py`` applies: one thread count
for every case (``--threads``, default 1), cases alternate round by round, the median round by peak memory is
reported, a loaded machine is refused unless ``--allow-noisy``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time
import types
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import discipline

THREADS = discipline.pin_threads_early()  # before numpy, torch and jax load (workers get --threads too)

SHAPES = {
    "mid": dict(hidden_size=1024, num_hidden_layers=8, vocab_size=32000, intermediate_size=2816,
                num_attention_heads=16, num_key_value_heads=8, seq=512),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, vocab_size=256, intermediate_size=128,
                 num_attention_heads=4, num_key_value_heads=2, seq=32),
}
MODES = ("full", "lora", "qlora", "qlora-dq")
RANK, ALPHA = 16, 32.0
GRPO_BETA = 0.04
TARGETS = dict(lora_over_full=0.40, nf4_over_bf16=0.30)


# -- memory readings ----------------------------------------------------------------------------

def _status_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _rss() -> int:
    rss = _status_bytes("VmRSS")
    return rss if rss is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak() -> str:
    """Reset the kernel's resident high-water mark (Linux >= 4.0); the method the peak reading will be."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return "VmHWM after clear_refs"
    except OSError:
        return "ru_maxrss (clear_refs refused: the whole process life)"


def _peak(method: str) -> int:
    hwm = _status_bytes("VmHWM") if method.startswith("VmHWM") else None
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# -- the cases ----------------------------------------------------------------------------------

def _spec(shape: str):
    from diptych.core.spec import tiny_spec

    dims = {k: v for k, v in SHAPES[shape].items() if k != "seq"}
    return tiny_spec("llama", max_position_embeddings=max(512, SHAPES[shape]["seq"]), tie_word_embeddings=False,
                     **dims)


def _lora_config(mode: str):
    from diptych.core.lora import LoRAConfig

    if mode == "full":
        return None
    return LoRAConfig(r=RANK, alpha=ALPHA, quantize_base="nf4" if mode.startswith("qlora") else "none",
                      double_quant=mode == "qlora-dq")


def _batch(spec, seq: int, kind: str, rows: int = 1) -> dict:
    import numpy as np

    from diptych.core.advantages import compute_advantages
    from diptych.core.trainers.base import pack_sequences

    rng = np.random.default_rng(0)
    prompt_len = seq // 4
    prompts = [rng.integers(3, spec.vocab_size, size=prompt_len).tolist() for _ in range(rows)]
    comps = [rng.integers(3, spec.vocab_size, size=seq - prompt_len).tolist() for _ in range(rows)]
    batch = pack_sequences(prompts, comps, seq, pad_id=0)
    if kind == "grpo":
        batch["advantages"] = compute_advantages("grpo", np.arange(rows, dtype=np.float32), rows)
    return batch


def _build(backend: str, spec, mode: str, seed: int = 0):
    from diptych.core.backend import get_backend

    be = get_backend(backend)
    weights = spec.init_weights(seed)
    model = be.build(spec, weights)
    cfg = _lora_config(mode)
    if cfg is not None:
        model = be.apply_lora(model, cfg, seed=seed)
    del weights
    return be, model, cfg


def _torch_tensor_bytes(state) -> dict[str, int]:
    import torch

    model_bytes, seen = 0, set()
    tensors = [*state.model.parameters(), *state.model.buffers()]
    for m in state.model.modules():
        q = getattr(m, "quantized", None)
        if q is not None and hasattr(q, "tensors"):
            tensors.extend(q.tensors().values())
    for t in tensors:
        st = t.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            model_bytes += st.nbytes()
    opt = sum(t.nbytes for s in state.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor))
    return dict(model_bytes=model_bytes, optimizer_bytes=int(opt))


def _torch_live_bytes() -> int:
    import torch

    gc.collect()
    seen, total = set(), 0
    with warnings.catch_warnings():  # isinstance on some of torch's deprecated module aliases warns
        warnings.simplefilter("ignore")
        tensors = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    for t in tensors:
        try:
            st = t.untyped_storage()
            ptr = st.data_ptr()
        except (RuntimeError, NotImplementedError):  # fake / functional tensors left by torch.compile hold no bytes
            continue
        if ptr and ptr not in seen:
            seen.add(ptr)
            total += st.nbytes()
    return total


def _jax_live_bytes() -> int:
    import jax

    gc.collect()
    return int(sum(a.nbytes for a in jax.live_arrays()))


def _jax_tree_bytes(tree) -> int:
    import jax

    return int(sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves(tree)))


def _lora_module(backend: str):
    import importlib

    return importlib.import_module(f"diptych.backends.{backend}.lora")


def _target_bf16_bytes(model, be, spec) -> int:
    """Bytes of the targeted linears' weights in bf16 (what QLoRA's 4-bit base is measured against)."""
    import numpy as np

    from diptych.core.lora import adapter_modules

    shapes = spec.param_shapes()
    return sum(2 * int(np.prod(shapes[f"{m}.weight"])) for m in adapter_modules(be.export_adapters(model)))


def train_case(backend: str, shape: str, mode: str, steps: int) -> dict[str, Any]:
    """One subprocess's figures for ``mode`` on ``backend``: peak memory, tensor bytes, step time."""
    import numpy as np

    from diptych.core.losses import SFTLossConfig
    from diptych.core.optim import OptimConfig

    if backend == "torch":
        import torch

        torch.set_num_threads(THREADS)
    else:
        import jax  # noqa: F401
    baseline = _rss()
    spec = _spec(shape)
    be, model, cfg = _build(backend, spec, mode)
    state = be.init_train_state(model, OptimConfig(lr=1e-4, warmup_steps=0))
    batch = [_batch(spec, SHAPES[shape]["seq"], "sft")]
    grad_bytes = [0]
    if backend == "torch":
        opt_step = state.optimizer.step

        def step_reading_grads(*a, **k):
            grad_bytes[0] = sum(p.grad.nbytes for g in state.optimizer.param_groups for p in g["params"]
                                if p.grad is not None)
            return opt_step(*a, **k)

        state.optimizer.step = step_reading_grads
    state, metrics = be.train_step(state, batch, "sft", SFTLossConfig())  # warm-up (and JAX's compile)
    gc.collect()
    setup_rss = _rss()  # what the model, the train state and the libraries hold between steps
    method = _reset_peak()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = be.train_step(state, batch, "sft", SFTLossConfig())
        times.append(time.perf_counter() - t0)
    peak = _peak(method)
    out: dict[str, Any] = dict(backend=backend, mode=mode, seconds=float(np.mean(times)), loss=float(metrics["loss"]),
                               train_peak_bytes=int(peak - baseline), peak_rss_bytes=int(peak),
                               baseline_rss_bytes=int(baseline), setup_rss_bytes=int(setup_rss),
                               memory_method=method)
    if backend == "torch":
        out.update(_torch_tensor_bytes(state), grad_bytes=int(grad_bytes[0]))
    else:
        out.update(trainable_bytes=_jax_tree_bytes(state.params), frozen_bytes=_jax_tree_bytes(state.rest),
                   optimizer_bytes=_jax_tree_bytes(state.opt_state), live_array_bytes=_jax_live_bytes())
    if cfg is not None:
        out.update(base_bytes=int(_lora_module(backend).nbytes(state.model)),
                   bf16_bytes=_target_bf16_bytes(state.model, be, spec))
    return out


def grpo_case(backend: str, shape: str, mode: str, beta: float) -> dict[str, Any]:
    """One GRPO policy step with ``beta``; the reference (when beta > 0) made by the trainers' own rule."""
    from diptych.core.losses import policy_preset
    from diptych.core.optim import OptimConfig
    from diptych.core.trainers.api import Trainer

    if backend == "torch":
        import torch

        torch.set_num_threads(THREADS)
    spec = _spec(shape)
    be, model, cfg = _build(backend, spec, mode)
    state = be.init_train_state(model, OptimConfig(lr=1e-4, warmup_steps=0))
    seq = SHAPES[shape]["seq"]
    batch = _batch(spec, seq, "grpo", rows=2)
    ref = None
    if beta > 0:
        owner = types.SimpleNamespace(lora=cfg, checkpoint_root=None, backend=be)
        ref = Trainer.reference_model(owner, state, 0)
        lp = be.logprobs(ref, be.from_numpy(batch["tokens"][:, :-1]), be.from_numpy(batch["attention_mask"][:, :-1]),
                         be.from_numpy(batch["tokens"][:, 1:]), 1.0)
        batch["ref_logprobs"] = (be.to_numpy(lp) * batch["mask"]).astype("float32")
    state, metrics = be.train_step(state, [batch], "policy", policy_preset("grpo", beta=beta))
    live = _torch_live_bytes() if backend == "torch" else _jax_live_bytes()
    return dict(backend=backend, mode=mode, beta=beta, live_bytes=int(live), loss=float(metrics["loss"]),
                holds_reference=ref is not None, reference_kind=type(ref).__name__ if ref is not None else None)


# -- the driver ---------------------------------------------------------------------------------

def _subprocess(args: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", *args, "--threads", str(THREADS)]
    # A fixed mmap threshold makes glibc return large freed blocks to the system, so the resident set
    # reflects live memory (its adaptive threshold keeps freed blocks of up to 32 MiB in the heap).
    env = dict(os.environ, JAX_PLATFORMS="cpu", MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"lora_memory worker {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _mib(n: float) -> str:
    return f"{n / 2**20:8.1f} MiB"


def summarise(train: dict[str, dict[str, Any]], grpo: dict[str, dict[str, Any]], backends: list[str],
              modes: list[str]) -> tuple[dict[str, Any], list[str], bool]:
    """Ratios against the targets, the table, and whether every target held."""
    results: dict[str, Any] = {"train": train, "grpo": grpo, "targets": TARGETS, "checks": {}}
    table, ok = [], True
    for b in backends:
        full = train.get(f"{b}/full")
        for m in modes:
            r = train[f"{b}/{m}"]
            line = f"{b:5s} {m:9s} peak {_mib(r['train_peak_bytes'])}  step {r['seconds']:7.2f} s"
            if full is not None and m != "full":
                ratio = r["train_peak_bytes"] / full["train_peak_bytes"]
                results["checks"][f"{b}/{m}/peak_over_full"] = ratio
                line += f"  peak {ratio:6.1%} of full"
                if m == "lora":
                    ok &= ratio <= TARGETS["lora_over_full"]
                    line += f" (target <= {TARGETS['lora_over_full']:.0%})"
            if "base_bytes" in r:
                nf = r["base_bytes"] / r["bf16_bytes"]
                results["checks"][f"{b}/{m}/base_over_bf16"] = nf
                line += f"  base {nf:6.1%} of bf16"
                if m.startswith("qlora"):
                    ok &= nf <= TARGETS["nf4_over_bf16"]
                    line += f" (target <= {TARGETS['nf4_over_bf16']:.0%})"
            table.append(line)
        for m in ("full", "lora"):
            zero, pos = grpo.get(f"{b}/{m}/beta0"), grpo.get(f"{b}/{m}/beta")
            if zero is None or pos is None:
                continue
            extra = pos["live_bytes"] - zero["live_bytes"]
            results["checks"][f"{b}/{m}/grpo_reference_bytes"] = extra
            line = (f"{b:5s} grpo {m:4s} live tensors beta=0 {_mib(zero['live_bytes'])}, beta={GRPO_BETA} "
                    f"{_mib(pos['live_bytes'])}: the reference adds {_mib(extra)}")
            if m == "lora":
                no_copy = abs(extra) <= 0.01 * zero["live_bytes"]
                results["checks"][f"{b}/lora/grpo_no_reference_copy"] = no_copy
                ok &= no_copy
                line += " (target: nothing)"
            table.append(line)
    return results, table, ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backend", choices=["jax", "torch", "both"], default="both")
    p.add_argument("--shape", choices=sorted(SHAPES), default="mid",
                   help="mid: hidden 1024, 8 layers, vocab 32k, seq 512 (the issue's); tiny: a smoke run")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {', '.join(MODES)}")
    p.add_argument("--steps", type=int, default=2, help="timed train steps per round, after one warm-up step")
    p.add_argument("--no-grpo", dest="grpo", action="store_false", help="skip the GRPO reference cases")
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    discipline.add_arguments(p)
    a = p.parse_args(argv)
    if a.worker:
        kind, backend, shape, mode, x = a.worker
        rec = train_case(backend, shape, mode, int(x)) if kind == "train" else grpo_case(backend, shape, mode,
                                                                                          float(x))
        print(json.dumps(rec))
        return 0
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    bad = sorted(set(modes) - set(MODES))
    if bad:
        raise SystemExit(f"--modes {', '.join(bad)} unknown; choose from {', '.join(MODES)}.")
    if a.steps < 1:
        raise SystemExit(f"--steps must be >= 1, got {a.steps}.")
    backends = ["jax", "torch"] if a.backend == "both" else [a.backend]
    bench = discipline.Bench("lora_memory", a, dict(shape=a.shape, dims=SHAPES[a.shape], modes=modes, rank=RANK,
                                                    alpha=ALPHA, steps=a.steps, grpo_beta=GRPO_BETA, dtype="float32",
                                                    backends=backends))
    contenders = {f"{b}/{m}": (lambda b=b, m=m: _subprocess(["train", b, a.shape, m, str(a.steps)]))
                  for b in backends for m in modes}
    train = bench.run(contenders, "train_peak_bytes")
    grpo: dict[str, dict[str, Any]] = {}
    if a.grpo:
        cases = {f"{b}/{m}/{'beta' if beta else 'beta0'}":
                 (lambda b=b, m=m, beta=beta: _subprocess(["grpo", b, a.shape, m, str(beta)]))
                 for b in backends for m in ("full", "lora") for beta in (0.0, GRPO_BETA)}
        grpo = bench.run(cases, "live_bytes", rounds=1, tag="grpo")  # byte counts do not vary between rounds
    results, table, ok = summarise(train, grpo, backends, modes)
    return bench.finish(results, table, a.json, ok=ok)


if __name__ == "__main__":
    sys.exit(main())
