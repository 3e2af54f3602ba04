"""Sharded parity (``diptych parity --mesh fsdp=2[,tensor=2]``): the train-step cases on a device mesh equal the
one-device run on each backend, and the sharded JAX run equals the sharded torch run.

Each backend runs in its own processes, as a real launch does: JAX in one process with ``mesh.size`` simulated
(or real) devices (``--xla_force_host_platform_device_count`` on CPU, set before jax loads), torch under
``torchrun --nproc-per-node mesh.size`` (gloo on CPU, NCCL on GPU). A worker trains every case ``steps``
optimizer steps on the mesh and on one device from the same numpy batches, and writes the losses, the final
weights and (sft) greedy tokens of both; the parent compares them under the parity tolerances
(:data:`diptych.parity.harness.TOLERANCES`) and returns :class:`~diptych.parity.harness.Case` rows.

Cases: ``sft``, ``dpo``, ``grpo`` (fixed rollouts: recorded sampler and reference log-probs), ``ppo`` (policy
plus clipped value loss through the value head) and ``recurrent`` (a Huginn-format recurrent-depth model with
truncated backprop, r = 3, k = 2). Torch has no tensor-parallel plan for the fused recurrent projections, so
that pair is skipped with its reason.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from diptych.core.mesh import MeshConfig, MeshError
from diptych.parity.harness import Case, Report, compare

CASES = ("sft", "dpo", "grpo", "ppo", "recurrent")
STEPS = 5
ROWS = 8
"""Rows per micro-batch (two per step): divisible by every ``data x fsdp`` up to 8."""
SEQ = 12
VOCAB = 64
DEPTH = (3, 2)
"""The recurrent case's (r, k): one iteration without gradient, two with."""
PROMPTS = [[5, 9, 13, 2], [7, 7, 1], [3, 30, 12, 40, 8], [11]]
NEW_TOKENS = 6
WORKER_TIMEOUT = 1800


# -- the cases: numpy only, the same arrays on every backend and layout ---------------------------
def spec_for(name: str, model_type: str = "llama") -> Any:
    """The tiny model of a case: 4 heads / 2 KV heads (split by tensor=2), hidden 32 (split by fsdp up to 8)."""
    if name == "recurrent":
        from diptych.core.recurrent_spec import tiny_recurrent_spec

        return tiny_recurrent_spec(n_embd=32, intermediate_size=64, vocab_size=VOCAB)
    from diptych.core.spec import tiny_spec

    return tiny_spec(model_type, vocab_size=VOCAB, hidden_size=32, intermediate_size=64)


def optim_for(dtype: str) -> Any:
    """AdamW at lr 1e-2 (fp32: the runs move far enough that equal weights mean something); 1e-4 under bf16,
    as the train suite: Adam moves a weight by about lr whatever its gradient's size, so a near-zero gradient
    whose bf16 rounding flips sign moves it 2 x lr apart, and lr bounds that."""
    from diptych.core.optim import OptimConfig

    return OptimConfig(lr=1e-4 if dtype == "bfloat16" else 1e-2, warmup_steps=0, weight_decay=0.01, max_grad_norm=1.0,
                       mixed_precision="bf16" if dtype == "bfloat16" else "none")


def _rows(rng: np.random.Generator, prompt: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left-padded rows (0-2 pads), the loss mask on a completion of random length after ``prompt`` tokens."""
    tokens = rng.integers(1, VOCAB, size=(ROWS, SEQ)).astype(np.int32)
    am = np.ones((ROWS, SEQ), np.int32)
    mask = np.zeros((ROWS, SEQ - 1), np.float32)
    mask[:, prompt - 1:] = 1.0
    for i, (pad, end) in enumerate(zip(rng.integers(0, 3, size=ROWS), rng.integers(prompt + 1, SEQ, size=ROWS))):
        am[i, :pad], tokens[i, :pad] = 0, 0
        mask[i, end:] = 0.0
    return tokens, am, mask


def batch_for(name: str, seed: int) -> dict[str, np.ndarray]:
    """One micro-batch of case ``name`` in its loss's layout."""
    rng = np.random.default_rng(seed)
    if name in ("sft", "recurrent"):
        tokens, am, mask = _rows(rng, 4)
        return {"tokens": tokens, "attention_mask": am, "mask": mask}
    if name == "dpo":
        out = {}
        for side in ("chosen", "rejected"):
            tokens, am, mask = _rows(rng, 4)
            out.update({f"{side}_tokens": tokens, f"{side}_attention_mask": am, f"{side}_mask": mask,
                        f"ref_{side}_logprobs": (np.log(1 / VOCAB) + 0.1 * rng.standard_normal((ROWS, SEQ - 1))
                                                 ).astype(np.float32)})
        return out
    tokens, am, mask = _rows(rng, 5)
    old = (np.log(1 / VOCAB) + 0.1 * rng.standard_normal((ROWS, SEQ - 1))).astype(np.float32)
    out = {"tokens": tokens, "attention_mask": am, "mask": mask, "old_logprobs": old}
    if name == "grpo":
        out["advantages"] = rng.standard_normal(ROWS).astype(np.float32)
        out["ref_logprobs"] = (old + 0.05 * rng.standard_normal((ROWS, SEQ - 1))).astype(np.float32)
    elif name == "ppo":
        out["advantages"] = rng.standard_normal((ROWS, SEQ - 1)).astype(np.float32)
        out["old_values"] = (0.1 * rng.standard_normal((ROWS, SEQ - 1))).astype(np.float32)
        out["returns"] = rng.standard_normal((ROWS, SEQ - 1)).astype(np.float32)
    else:
        raise ValueError(f"Unknown mesh parity case {name!r}; choices: {', '.join(CASES)}.")
    return out


def loss_for(name: str) -> tuple[Any, Any]:
    """``(loss, loss config)`` as the trainers pass them to ``train_step``."""
    from diptych.core.losses import PolicyLossConfig, PreferenceLossConfig, SFTLossConfig, ValueLossConfig

    if name in ("sft", "recurrent"):
        return "sft", SFTLossConfig()
    if name == "dpo":
        return "preference", PreferenceLossConfig(beta=0.1)
    if name == "grpo":
        return "policy", PolicyLossConfig(beta=0.04)
    if name == "ppo":  # PPO's combined objective (core.trainers.ppo.PPOConfig.loss) at vf_coef 0.1
        return ({"policy": 1.0, "value": 0.1},
                {"policy": PolicyLossConfig(eps_low=0.2, eps_high=0.2, beta=0.0), "value": ValueLossConfig(clip=0.2)})
    raise ValueError(f"Unknown mesh parity case {name!r}; choices: {', '.join(CASES)}.")


def steps_for(name: str, steps: int) -> list[list[dict[str, np.ndarray]]]:
    return [[batch_for(name, 10 * s + j) for j in range(2)] for s in range(steps)]


def label(mesh: MeshConfig) -> str:
    """``fsdp=2,tensor=2``: the axes larger than one."""
    return ",".join(f"{a}={n}" for a, n in mesh.as_dict().items() if n > 1) or "one"


def check_request(mesh: MeshConfig, backend: str, name: str) -> str | None:
    """Why ``(backend, case)`` cannot run on ``mesh`` (None: it can), checked before any process starts."""
    from diptych.core import mesh as M

    spec = spec_for(name)
    try:
        M.check_backend(mesh, backend, spec)
        M.check_model(mesh, spec)
        M.check_batch(mesh, ROWS)
    except MeshError as e:
        return str(e)
    return None


# -- workers (each in its own processes) ------------------------------------------------------------
def _jax_worker(mesh: MeshConfig, names: Sequence[str], steps: int, dtype: str, model_type: str) -> dict:
    import jax

    from diptych.backends.jax import sampler
    from diptych.backends.jax import sharding as S
    from diptych.backends.jax import train as T

    out: dict[str, np.ndarray] = {}
    for name in names:
        spec, loss, cfg = spec_for(name, model_type), *loss_for(name)
        for where in ("mesh", "one"):
            model = T._lib(spec).build(spec, spec.init_weights(0), **_build_options(name))
            st = T.init_train_state(model, optim_for(dtype), value_head=name == "ppo")
            if where == "mesh":
                st = S.shard_state(st, S.make_mesh(mesh, jax.devices()[:mesh.size]))
            losses = []
            for mbs in steps_for(name, steps):
                st, m = T.train_step(st, mbs, loss, cfg)
                losses.append(float(m["loss"]))
            _record(out, f"{name}/{where}", losses, T.export_weights(st), T.export_value_head(st))
            if name == "sft":
                out[f"{name}/{where}/tokens"] = np.asarray(sampler.generate(st.model, PROMPTS, _greedy()).tokens)
    return out


def _torch_worker(mesh: MeshConfig, names: Sequence[str], steps: int, dtype: str, model_type: str) -> dict | None:
    import torch

    from diptych.backends.torch import distributed as D
    from diptych.backends.torch import sampler
    from diptych.backends.torch import train as T

    torch.set_num_threads(1)
    D.init_process_group()
    out: dict[str, np.ndarray] = {}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for name in names:
        spec, loss, cfg = spec_for(name, model_type), *loss_for(name)

        def build(spec: Any = spec, name: str = name) -> Any:
            return T._lib(spec).build(spec, spec.init_weights(0), device=device, **_build_options(name))

        st = D.init_train_state(build(), optim_for(dtype), mesh=mesh, value_head=name == "ppo")
        losses = []
        for mbs in steps_for(name, steps):
            st, m = D.train_step(st, mbs, loss, cfg)
            losses.append(float(m["loss"]))
        weights, head = D.export_weights(st), T.export_value_head(st)
        tokens = np.asarray(D.generate(st.model, PROMPTS, _greedy()).tokens) if name == "sft" else None
        if not D.is_rank0():
            continue
        _record(out, f"{name}/mesh", losses, weights, head)
        if tokens is not None:
            out[f"{name}/mesh/tokens"] = tokens
        ref = T.init_train_state(build(), optim_for(dtype), value_head=name == "ppo")  # one process (rank 0)
        losses = []
        for mbs in steps_for(name, steps):
            ref, m = T.train_step(ref, mbs, loss, cfg)
            losses.append(float(m["loss"]))
        _record(out, f"{name}/one", losses, T.export_weights(ref), T.export_value_head(ref))
        if name == "sft":
            out[f"{name}/one/tokens"] = np.asarray(sampler.generate(ref.model, PROMPTS, _greedy()).tokens)
    import torch.distributed as dist

    if dist.is_initialized():  # every rank leaves together: one gone early aborts the others' gloo threads
        dist.barrier()
        dist.destroy_process_group()
    return out or None


def _build_options(name: str) -> dict[str, Any]:
    return {"num_steps": DEPTH[0], "num_grad_steps": DEPTH[1]} if name == "recurrent" else {}


def _greedy() -> Any:
    from diptych.core.sampling import SamplingConfig

    return SamplingConfig(max_new_tokens=NEW_TOKENS, temperature=0.0)


def _record(out: dict, key: str, losses: list[float], weights: dict, head: dict | None) -> None:
    out[f"{key}/loss"] = np.asarray(losses, np.float64)
    out[f"{key}/weights"] = _flat({**weights, **(head or {})})


def _flat(weights: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(weights[k], np.float64).ravel() for k in sorted(weights)])


def worker_main(argv: Sequence[str]) -> int:
    """``python -m diptych.parity.mesh_suite BACKEND MESH CASES STEPS DTYPE MODEL_TYPE OUT.npz`` (what
    :func:`run_backend` launches)."""
    backend, mesh_text, names, steps, dtype, model_type, path = argv
    mesh = MeshConfig.parse(mesh_text)
    worker = _jax_worker if backend == "jax" else _torch_worker
    out = worker(mesh, names.split(","), int(steps), dtype, model_type)
    if out is not None:
        np.savez(path, **out)
    return 0


# -- the parent ---------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_command(backend: str, mesh: MeshConfig, names: Sequence[str], steps: int, dtype: str, model_type: str,
                   out: Path) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of one backend's worker."""
    args = ["-m", "diptych.parity.mesh_suite", backend, str(mesh), ",".join(names), str(steps), dtype, model_type,
            str(out)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "XLA_FLAGS")}
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    if backend == "jax":
        if env.get("JAX_PLATFORMS", "cpu") in ("", "cpu"):
            env["JAX_PLATFORMS"] = "cpu"
            env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={mesh.size}"
        return [sys.executable, *args], env
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={mesh.size}",
            "--master-addr=127.0.0.1", f"--master-port={_free_port()}", *args], env


def run_backend(backend: str, mesh: MeshConfig, names: Sequence[str], steps: int, dtype: str, model_type: str,
                ) -> dict[str, np.ndarray]:
    """One backend's worker run: its results, or ``RuntimeError`` with the end of its output."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "runs.npz"
        cmd, env = worker_command(backend, mesh, names, steps, dtype, model_type, out)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=WORKER_TIMEOUT, check=False)
        if proc.returncode or not out.is_file():
            tail = [ln for ln in (proc.stderr + proc.stdout).splitlines()
                    if "Error" in ln and "ChildFailedError" not in ln][-3:] or proc.stderr.splitlines()[-12:]
            raise RuntimeError(f"{backend} worker on mesh {mesh} failed ({proc.returncode}): " + "\n".join(tail))
        with np.load(out) as f:
            return dict(f)


def run_mesh(mesh: MeshConfig | str, backends: Sequence[str], cases: Sequence[str] | None = None, *,
             steps: int = STEPS, dtype: str = "float32", model_type: str = "llama") -> Report:
    """The sharded parity report of ``mesh``: per backend, the mesh run against the one-device run (loss of
    every step, final weights incl. PPO's value head, sft greedy tokens); then each pair of backends' mesh runs."""
    mesh = MeshConfig.coerce(mesh)
    if mesh.is_single:
        raise MeshError("--mesh needs more than one device (e.g. --mesh fsdp=2); a one-device run is what the mesh "
                        "runs are compared against.")
    names = list(cases or CASES)
    unknown = [c for c in names if c not in CASES]
    if unknown:
        raise ValueError(f"Unknown mesh parity case(s) {', '.join(unknown)}; choices: {', '.join(CASES)}.")
    report = Report()
    runs: dict[str, dict[str, np.ndarray]] = {}
    for be in backends:
        ok = []
        for name in names:
            why = check_request(mesh, be, name)
            if why:
                report.skipped.append(f"mesh {label(mesh)}: {be} {name}: {why}")
            else:
                ok.append(name)
        if not ok:
            continue
        try:
            runs[be] = run_backend(be, mesh, ok, steps, dtype, model_type)
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            report.cases.append(Case(f"run:{','.join(ok)}", f"{be}@{label(mesh)}", "worker", dtype, float("inf"),
                                     float("inf"), 0.0, False, _reason(str(e))))
    for be, r in runs.items():
        report.cases += _pair(r, r, "mesh", "one", f"{be}@{label(mesh)}", f"{be}@one", dtype, steps)
    done = list(runs)
    for i, a in enumerate(done):
        for b in done[i + 1:]:
            report.cases += _pair(runs[a], runs[b], "mesh", "mesh", f"{a}@{label(mesh)}", f"{b}@{label(mesh)}",
                                  dtype, steps)
    return report


def _reason(text: str) -> str:
    """The line of a failed worker's output that says what went wrong (its last exception line)."""
    lines = [ln for ln in text.splitlines() if ln.strip() and not set(ln.strip()) <= set("=-")]
    errors = [ln for ln in lines if "Error" in ln or "Exception" in ln]
    return (errors or lines or ["worker failed"])[-1].strip()[:300]


def _pair(ra: dict, rb: dict, wa: str, wb: str, la: str, lb: str, dtype: str, steps: int) -> list[Case]:
    cases = []
    for name in CASES:
        ka, kb = f"{name}/{wa}", f"{name}/{wb}"
        if f"{ka}/loss" not in ra or f"{kb}/loss" not in rb:
            continue
        cases.append(compare(f"loss:{name} steps 1-{steps}", la, lb, ra[f"{ka}/loss"], rb[f"{kb}/loss"], dtype))
        cases.append(compare(f"weights:{name} after {steps}", la, lb, ra[f"{ka}/weights"], rb[f"{kb}/weights"],
                             dtype))
        if f"{ka}/tokens" in ra and f"{kb}/tokens" in rb and dtype == "float32":  # bf16: equal only up to ties
            cases.append(compare(f"tokens:{name} greedy", la, lb, ra[f"{ka}/tokens"], rb[f"{kb}/tokens"], dtype,
                                 tol=0.0))
    return cases


if __name__ == "__main__":
    raise SystemExit(worker_main(sys.argv[1:]))
