"""GPU timings of the kernel twins: fused vs chunked vs naive (and Liger when installed).

    python benchmarks/kernels_gpu.py [--json PATH] [--tokens 8192 --hidden 4096 --vocab 128256 --dtype bfloat16]

On a CUDA GPU (torch): the selective log-prob kernel (forward + backward) and RMSNorm (forward +
backward) through ``kernels="fused"`` (Triton), ``"chunked"`` and ``"reference"`` (naive), plus
Liger's fused linear cross-entropy when ``liger_kernel`` is importable. When jax sees a GPU, the
Pallas twins are timed the same way. Each figure is the median of ``--rounds`` alternating timed
runs after one warm-up, and is reported as milliseconds, TFLOP/s (log-probs) and achieved bandwidth as a
fraction of the GPU's peak, where bandwidth counts the minimal bytes each op must move (read
inputs once, write outputs once), so a fraction near 1 means memory-bound at peak.

With no CUDA GPU it says so and runs a CPU fallback: chunked vs naive on small shapes (the fused
kernels need a GPU; on CPU they only run, slowly, in the interpreters used by the tests).

The shared discipline (``benchmarks/discipline.py``) applies: ``--threads`` for the host side
(default 1), the paths of each op alternate round by round after one warm-up each, the median
round (``--rounds``, default 5) is reported, and a loaded machine is refused (host-side launch
overhead is part of every figure).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import discipline

THREADS = discipline.pin_threads_early()  # before numpy, torch and jax load

# Peak HBM bandwidth in bytes/s, by substring of the device name (first match wins).
PEAK_BANDWIDTH = [("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("A100-SXM4-80GB", 2.04e12),
                  ("A100", 1.555e12), ("L40S", 0.864e12), ("A10G", 0.6e12), ("L4", 0.3e12), ("T4", 0.32e12)]


def _contender(fn: Callable[[], None], sync: Callable[[], None]) -> Callable[[], dict]:
    """Warm ``fn`` up once; each call is then one synchronised timed run."""
    fn()
    sync()

    def run() -> dict:
        start = time.perf_counter()
        fn()
        sync()
        return {"seconds": time.perf_counter() - start}

    return run


def _peak_bandwidth(name: str) -> float | None:
    return next((bw for key, bw in PEAK_BANDWIDTH if key in name), None)


TABLE: list[str] = []
"""The printed table, collected so it comes after the discipline's header (and its NOISY mark)."""


def _row(op: str, path: str, res: dict, nbytes: float, flops: float, peak_bw: float | None) -> dict:
    seconds = res["seconds"]
    bw = nbytes / seconds
    row = dict(op=op, path=path, ms=seconds * 1e3, tflops=flops / seconds / 1e12 if flops else None,
               bandwidth_gbs=bw / 1e9, bandwidth_fraction=(bw / peak_bw) if peak_bw else None,
               rounds_ms=[r["seconds"] * 1e3 for r in res["rounds"]])
    frac = f"{row['bandwidth_fraction']:.1%} of peak" if peak_bw else "peak unknown"
    tf = f"{row['tflops']:8.3f} TFLOP/s" if flops else " " * 16
    TABLE.append(f"  {op:10s} {path:10s} {row['ms']:9.3f} ms {tf} {row['bandwidth_gbs']:8.1f} GB/s ({frac})")
    return row


def bench_torch(bench: discipline.Bench, n: int, h: int, v: int, dtype_name: str, device: str,
                paths: list[str]) -> list[dict]:
    import torch

    from diptych.backends.torch.kernels import rms_norm, selective_logprobs

    dtype = getattr(torch, dtype_name)
    elt = torch.finfo(dtype).bits // 8
    gen = torch.Generator(device="cpu").manual_seed(0)
    hid = (torch.randn(n, h, generator=gen)).to(device, dtype).requires_grad_()
    w = (torch.randn(v, h, generator=gen) * 0.02).to(device, dtype).requires_grad_()
    y = torch.randint(0, v, (n,), generator=gen).to(device)
    x = torch.randn(n, h, generator=gen).to(device, dtype).requires_grad_()
    nw = torch.ones(h, device=device, dtype=dtype, requires_grad=True)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    peak = _peak_bandwidth(torch.cuda.get_device_name()) if device == "cuda" else None
    rows = []
    lp_bytes = 2 * (n * h + v * h) * elt + 3 * n * 4  # read h, W; write dh, dW; per-token outputs
    lp_flops = 4 * 2 * n * v * h  # forward, recompute, dh, dW
    lp: dict[str, Callable[[], dict]] = {}
    for path in paths:
        def lp_step(path=path):
            hid.grad = w.grad = None
            lp, ent = selective_logprobs(hid, w, y, 1.0, kernels=path)
            (lp.sum() + ent.sum()).backward()
        lp[path] = _contender(lp_step, sync)
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        TABLE.append("  (liger_kernel not installed: no Liger comparison)")
    else:
        liger = LigerFusedLinearCrossEntropyLoss(reduction="sum")

        def liger_step():
            hid.grad = w.grad = None
            liger(w, hid, y).backward()
        lp["liger"] = _contender(liger_step, sync)
    res = bench.run(lp, "seconds", tag="torch logprobs")
    rows += [_row("logprobs", path, res[path], lp_bytes, lp_flops, peak) for path in lp]
    norm_bytes = 5 * n * h * elt  # forward: read x, write y; backward: read x, dy, write dx
    norm: dict[str, Callable[[], dict]] = {}
    for path in [p for p in paths if p != "chunked"]:
        def norm_step(path=path):
            x.grad = nw.grad = None
            rms_norm(x, nw, 1e-6, kernels=path).sum().backward()
        norm[path] = _contender(norm_step, sync)
    res = bench.run(norm, "seconds", tag="torch rms_norm")
    rows += [_row("rms_norm", path, res[path], norm_bytes, 0, peak) for path in norm]
    return rows


def bench_jax(bench: discipline.Bench, n: int, h: int, v: int, dtype_name: str, paths: list[str]) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from diptych.backends.jax.kernels import rms_norm, selective_logprobs

    dtype = jnp.dtype(dtype_name)
    rng = np.random.default_rng(0)
    hid = jnp.asarray(rng.standard_normal((n, h), dtype=np.float32), dtype)
    w = jnp.asarray(rng.standard_normal((v, h), dtype=np.float32) * 0.02, dtype)
    y = jnp.asarray(rng.integers(0, v, n), jnp.int32)
    peak = _peak_bandwidth(jax.devices()[0].device_kind) if jax.default_backend() == "gpu" else None
    lp: dict[str, Callable[[], dict]] = {}
    for path in paths:
        step = jax.jit(jax.grad(lambda a, b, path=path: sum(jnp.sum(t) for t in selective_logprobs(
            a, b, y, 1.0, kernels=path)), argnums=(0, 1)))
        lp[path] = _contender(lambda step=step: jax.block_until_ready(step(hid, w)), lambda: None)
    res = bench.run(lp, "seconds", tag="jax logprobs")
    rows = [_row("logprobs", path, res[path], 2 * (n * h + v * h) * dtype.itemsize, 8 * n * v * h, peak)
            for path in lp]
    nw = jnp.ones((h,), dtype)
    norm: dict[str, Callable[[], dict]] = {}
    for path in [p for p in paths if p != "chunked"]:
        step = jax.jit(jax.grad(lambda a, b, path=path: jnp.sum(rms_norm(a, b, 1e-6, kernels=path)), argnums=(0, 1)))
        norm[path] = _contender(lambda step=step: jax.block_until_ready(step(hid, nw)), lambda: None)
    res = bench.run(norm, "seconds", tag="jax rms_norm")
    rows += [_row("rms_norm", path, res[path], 5 * n * h * dtype.itemsize, 0, peak) for path in norm]
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--cpu-shape", type=int, nargs=3, default=[1024, 256, 8192], metavar=("N", "H", "V"),
                   help="tokens, hidden and vocab of the CPU fallback")
    discipline.add_arguments(p, rounds=5)
    a = p.parse_args(argv)
    bench = discipline.Bench("kernels_gpu", a)
    shape = dict(tokens=a.tokens, hidden=a.hidden, vocab=a.vocab, dtype=a.dtype)
    results: dict = {}
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        name = torch.cuda.get_device_name()
        TABLE.append(f"torch on {name} (peak bandwidth {_peak_bandwidth(name) or 'unknown'} B/s), "
                     f"N={a.tokens} H={a.hidden} V={a.vocab} {a.dtype}")
        bench.config["device"] = name
        results["torch"] = bench_torch(bench, a.tokens, a.hidden, a.vocab, a.dtype, "cuda",
                                       ["fused", "chunked", "reference"])
    try:
        import jax

        jax_gpu = jax.default_backend() == "gpu"
    except ImportError:
        jax_gpu = False
    if jax_gpu:
        TABLE.append(f"jax on {jax.devices()[0].device_kind}")
        results["jax"] = bench_jax(bench, a.tokens, a.hidden, a.vocab, a.dtype, ["fused", "chunked", "reference"])
    if not has_cuda and not jax_gpu:
        n, h, v = a.cpu_shape
        TABLE.append(f"No CUDA GPU found: CPU fallback (chunked vs naive only, N={n} H={h} V={v} float32). These are "
                     "not GPU figures; the fused kernels need a GPU (or the slow interpreters the tests use).")
        bench.config["device"] = "cpu (fallback)"
        shape = dict(tokens=n, hidden=h, vocab=v, dtype="float32")
        paths = ["chunked", "reference"]
        if "torch" in sys.modules or _importable("torch"):
            TABLE.append("torch:")
            results["torch"] = bench_torch(bench, n, h, v, "float32", "cpu", paths)
        if _importable("jax"):
            TABLE.append("jax:")
            results["jax"] = bench_jax(bench, n, h, v, "float32", paths)
    bench.config["shape"] = shape
    return bench.finish(results, TABLE, a.json)


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


if __name__ == "__main__":
    sys.exit(main())
