"""Peak memory and time of selective log-probs + backward: chunked path vs the naive ``[T, V]`` path, on CPU.

    python benchmarks/logprob_memory.py                       # T=8192, H=1024, V=32768, fp32, both backends
    python benchmarks/logprob_memory.py --small --json out.json

What is measured (each case runs in a fresh subprocess so nothing else shares its high-water mark):

- torch: the growth of the process's peak resident set (``getrusage(RUSAGE_SELF).ru_maxrss``) across
  one forward + backward, after the inputs and the upstream gradients are allocated and touched.
  glibc serves these large tensors with ``mmap`` and returns them on free, so the high-water mark
  is the peak of bytes allocated during the step (outputs and gradients included).
- jax: XLA's own allocation plan for the jitted forward + backward,
  ``compiled.memory_analysis()``: ``temp_size_in_bytes + output_size_in_bytes`` (arguments excluded,
  as for torch). This is what XLA allocates, not an estimate from shapes.

The objective is ``sum(g1 * logp) + sum(g2 * entropy)``, differentiated w.r.t. hidden and weight.
Time is the wall clock of one step after compilation (jax) or of the measured step (torch).
The shared discipline (``benchmarks/discipline.py``) applies: ``--threads`` for both backends
(default 1), the naive and chunked cases alternate round by round in fresh subprocesses, the
median round (by time) is reported, and a loaded machine is refused.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import discipline

THREADS = discipline.pin_threads_early()  # before numpy, torch and jax load (workers get --threads too)

FULL = dict(T=8192, H=1024, V=32768)
SMALL = dict(T=2048, H=512, V=8192)
# Eight chunks at either size, so the small run shows the same ratio as the full one.
DEFAULT_CHUNK = dict(full=1024, small=256)


def _worker(backend: str, path: str, t: int, h: int, v: int, chunk: int, seed: int = 0) -> dict:
    import numpy as np

    rng = np.random.default_rng(seed)
    hid = rng.standard_normal((t, h), dtype=np.float32)
    w = rng.standard_normal((v, h), dtype=np.float32) * np.float32(0.03)
    y = rng.integers(0, v, size=t)
    g1 = rng.standard_normal(t, dtype=np.float32)
    g2 = rng.standard_normal(t, dtype=np.float32)
    if backend == "torch":
        import torch

        from diptych.backends.torch.kernels import selective_logprobs

        torch.set_num_threads(THREADS)
        ht, wt = torch.from_numpy(hid).requires_grad_(), torch.from_numpy(w).requires_grad_()
        yt, g1t, g2t = torch.from_numpy(y), torch.from_numpy(g1), torch.from_numpy(g2)
        del hid, w
        # Warm-up on a tiny problem: loads the BLAS kernels' code pages, which would count as growth.
        tiny = [torch.randn(64, h, requires_grad=True), torch.randn(256, h, requires_grad=True)]
        tl, te = selective_logprobs(*tiny, torch.zeros(64, dtype=torch.long), 1.0, kernels=path, chunk_size=16)
        (tl.sum() + te.sum()).backward()
        del tiny, tl, te
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        start = time.perf_counter()
        lp, ent = selective_logprobs(ht, wt, yt, 1.0, kernels=path, chunk_size=chunk)
        ((lp * g1t).sum() + (ent * g2t).sum()).backward()
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
        return dict(peak_bytes=int(peak), seconds=seconds, method="ru_maxrss growth over one step")
    import jax
    import jax.numpy as jnp

    from diptych.backends.jax.kernels import selective_logprobs

    def objective(a, b, yy, c1, c2):
        lp, ent = selective_logprobs(a, b, yy, 1.0, kernels=path, chunk_size=chunk)
        return jnp.sum(lp * c1) + jnp.sum(ent * c2)

    args = [jnp.asarray(x) for x in (hid, w, y.astype(np.int32), g1, g2)]
    step = jax.jit(jax.grad(objective, argnums=(0, 1)))
    compiled = step.lower(*args).compile()
    mem = compiled.memory_analysis()
    peak = int(mem.temp_size_in_bytes + mem.output_size_in_bytes)
    jax.block_until_ready(compiled(*args))  # warm-up: first-call allocations and thread pools
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    seconds = time.perf_counter() - start
    return dict(peak_bytes=peak, seconds=seconds, method="XLA memory_analysis temp+output")


def _run_case(backend: str, path: str, size: dict, chunk: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", backend, path, str(size["T"]), str(size["H"]), str(size["V"]),
           str(chunk), "--threads", str(THREADS)]
    # A fixed mmap threshold makes glibc return every large block on free (its adaptive threshold
    # would otherwise keep freed blocks up to 32 MiB in the heap, inflating the RSS high-water mark).
    env = dict(os.environ, JAX_PLATFORMS="cpu", MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{backend}/{path} worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backend", choices=["jax", "torch", "both"], default="both")
    p.add_argument("--small", action="store_true", help=f"use {SMALL} instead of {FULL} (for small machines)")
    p.add_argument("--chunk-size", type=int, help="tokens per chunk (default: T / 8)")
    p.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    discipline.add_arguments(p)
    a = p.parse_args(argv)
    if a.worker:
        backend, path, t, h, v, chunk = a.worker
        print(json.dumps(_worker(backend, path, int(t), int(h), int(v), int(chunk))))
        return 0
    size = SMALL if a.small else FULL
    a.chunk_size = a.chunk_size or DEFAULT_CHUNK["small" if a.small else "full"]
    backends = ["jax", "torch"] if a.backend == "both" else [a.backend]
    bench = discipline.Bench("logprob_memory", a, dict(size=size, dtype="float32", chunk_size=a.chunk_size,
                                                       backends=backends))
    contenders = {f"{b}/{path}": (lambda b=b, path=path: _run_case(b, path, size, a.chunk_size))
                  for b in backends for path in ("reference", "chunked")}
    res = bench.run(contenders, "seconds")
    results, table, ok = {}, [], True
    for b in backends:
        naive, chunked = res[f"{b}/reference"], res[f"{b}/chunked"]
        mem_ratio = chunked["peak_bytes"] / naive["peak_bytes"]
        time_ratio = chunked["seconds"] / naive["seconds"]
        results[b] = dict(naive=naive, chunked=chunked, memory_ratio=mem_ratio, time_ratio=time_ratio,
                          memory_ok=mem_ratio <= 0.25, time_ok=time_ratio <= 1.3)
        ok &= mem_ratio <= 0.25
        table.append(f"{b:5s} naive {naive['peak_bytes'] / 2**20:8.1f} MiB {naive['seconds']:7.2f} s | "
                     f"chunked {chunked['peak_bytes'] / 2**20:8.1f} MiB {chunked['seconds']:7.2f} s | "
                     f"memory {mem_ratio:.1%} (<= 25%) time {time_ratio:.2f}x (target <= 1.3x)  [{naive['method']}]")
    return bench.finish(results, table, a.json, ok=ok)


if __name__ == "__main__":
    sys.exit(main())
