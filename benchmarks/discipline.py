"""One benchmark discipline for every script in ``benchmarks/``.

Figures taken on a loaded machine said more about the load than about the code: at load
average 6-7 the peers' multi-threaded torch collapsed and diptych's single-threaded runs did
not, so the README promised speedups a quiet machine does not give. Every script therefore:

- pins one thread count for every contender (``--threads N``, default 1): ``torch.set_num_threads``
  (re-applied before each contender runs, in case a library changed it), ``OMP_NUM_THREADS``,
  ``MKL_NUM_THREADS``, ``OPENBLAS_NUM_THREADS`` and, for XLA, ``PJRT_NPROC``. In jax 0.10 the
  CPU client sizes its intra-op pool from ``PJRT_NPROC`` (then ``NPROC``); the older
  ``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=N`` recipe is
  accepted but leaves both cores busy (measured: CPU time / wall 1.9 with it, 1.0 with
  ``PJRT_NPROC=1``). The environment is read when numpy, torch and jax load, so scripts call
  :func:`pin_threads_early` before importing any of them;
- alternates contenders round by round (:func:`round_order` rotates the order, so each contender
  runs first as often as any other) and reports the median round (:func:`median_round`), never the
  best, with every round kept in the JSON;
- records the load average before and after every round, the CPU other processes used meanwhile, the
  thread settings in force for every contender, library versions and the machine;
- refuses to report on a loaded machine: when the load average exceeds the machine's core count at the
  start, or when, between two readings, the processes outside the benchmark's own process tree kept more
  than :data:`OTHERS_LIMIT` of a core busy (``/proc/stat`` minus the tree's own CPU time). After the first
  round the load average counts the benchmark's own work (a contender with two busy roles on two cores
  lifts it to about 2 by itself), so it judges only the start, unless ``/proc`` is missing, where every
  reading is judged by it as before. A refusal exits with :data:`NOISY_EXIT` and a message; with
  ``--allow-noisy`` the JSON says ``"noisy": true`` and the printed table says NOISY, so such a figure
  cannot reach the README unnoticed.

Model FLOPs (for the compute-bound shapes) are counted by :func:`causal_forward_flops` and its
callers; their docstrings give the formulas.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

NOISY_EXIT = 3
"""Exit status of a run refused because the machine was loaded."""


class Refused(SystemExit):
    """A run refused on a loaded machine: exits with :data:`NOISY_EXIT` after printing why."""

    def __init__(self, message: str) -> None:
        super().__init__(NOISY_EXIT)
        self.message = message
        print(message, file=sys.stderr)

THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "PJRT_NPROC", "XLA_FLAGS")
VERSIONED = ("diptych", "numpy", "torch", "jax", "jaxlib", "flax", "optax", "transformers", "trl", "accelerate",
             "datasets", "triton", "liger-kernel")


# -- threads ------------------------------------------------------------------------------------

def threads_from_argv(argv: Sequence[str] | None = None, default: int = 1) -> int:
    """The ``--threads`` value on a command line, read before the full parser exists."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--threads", type=int, default=default)
    ns, _ = pre.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    return ns.threads


def pin_threads_early(argv: Sequence[str] | None = None) -> int:
    """Set the thread environment from ``--threads`` before numpy / torch / jax are imported.

    Call it at the top of a script: BLAS and XLA read these variables once, when they load.
    """
    n = threads_from_argv(argv)
    _check_threads(n)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "PJRT_NPROC"):
        os.environ[var] = str(n)
    return n


def _check_threads(n: int) -> None:
    if n < 1:
        raise SystemExit(f"--threads must be >= 1, got {n}; every contender runs with the same thread count.")


def pin_threads(n: int) -> None:
    """Apply ``n`` threads now (torch at run time; the environment for subprocesses and late imports).

    Raises when a library that already loaded read a different count, since that contender
    would then run with other threads than the rest.
    """
    _check_threads(n)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "PJRT_NPROC"):
        old = os.environ.get(var)
        if old is not None and old != str(n) and ("jax" in sys.modules or "numpy" in sys.modules):
            raise SystemExit(f"{var}={old} was in force when numpy/jax loaded but --threads is {n}; pass --threads "
                             "on the command line (scripts read it before importing numpy) or unset the variable.")
        os.environ[var] = str(n)
    if "torch" in sys.modules:
        import torch

        torch.set_num_threads(n)
        if torch.get_num_interop_threads() != n:
            with contextlib.suppress(RuntimeError):  # allowed only before torch's first inter-op work
                torch.set_num_interop_threads(n)


def thread_state() -> dict[str, Any]:
    """The thread settings in force now, as a contender sees them."""
    state: dict[str, Any] = {var: os.environ.get(var) for var in THREAD_ENV}
    if "torch" in sys.modules:
        import torch

        state["torch_num_threads"] = torch.get_num_threads()
        state["torch_num_interop_threads"] = torch.get_num_interop_threads()
    return state


def versions(packages: Iterable[str] = VERSIONED) -> dict[str, str | None]:
    """Installed versions (None where a package is absent), read from package metadata."""
    out: dict[str, str | None] = {}
    for name in packages:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    mod = sys.modules.get("trl")
    if mod is not None and out.get("trl") is None:  # imported from --trl-path, outside the venv's metadata
        out["trl"] = getattr(mod, "__version__", None)
    return out


# -- load ---------------------------------------------------------------------------------------

def load_average() -> tuple[float, float, float]:
    """1, 5 and 15 minute load averages (a function so tests can fake a loaded machine)."""
    return os.getloadavg()


def core_count() -> int:
    return os.cpu_count() or 1


def is_noisy(readings: Iterable[Sequence[float]], cores: int) -> bool:
    """Whether any 1-minute load reading exceeds the core count."""
    return any(r[0] > cores for r in readings)


OTHERS_LIMIT = 0.25
"""Cores' worth of CPU other processes may use between two readings before a run is refused."""


def cpu_times() -> tuple[float, float] | None:
    """``(CPU seconds every process has used since boot, CPU seconds of this process and its descendants)``
    (a descendant reaped by one of them counts through its parent's children times), or None without ``/proc``
    (a function so tests can fake it)."""
    try:
        tick = os.sysconf("SC_CLK_TCK")
        with open("/proc/stat") as f:
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f.readline().split()[1:9])
        children: dict[int, list[int]] = {}
        own: dict[int, int] = {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    rest = f.read().rsplit(")", 1)[1].split()
            except OSError:  # it ended meanwhile
                continue
            pid = int(entry.name)
            children.setdefault(int(rest[1]), []).append(pid)
            own[pid] = sum(int(x) for x in rest[11:15])  # utime, stime, cutime, cstime
    except (OSError, ValueError, IndexError):
        return None
    tree, todo = 0, [os.getpid()]
    while todo:
        pid = todo.pop()
        tree += own.get(pid, 0)
        todo.extend(children.get(pid, ()))
    return (user + nice + system + irq + softirq + steal) / tick, tree / tick


# -- rounds -------------------------------------------------------------------------------------

def round_order(names: Sequence[str], round_index: int) -> list[str]:
    """Contenders' order in round ``round_index``: rotated by one each round."""
    names = list(names)
    if not names:
        return names
    k = round_index % len(names)
    return names[k:] + names[:k]


def median_round(records: Sequence[dict[str, Any]], metric: str) -> dict[str, Any]:
    """The round whose ``metric`` is the median (the lower middle one for an even count: a real round)."""
    ok = [r for r in records if isinstance(r.get(metric), (int, float))]
    if not ok:
        raise ValueError(f"no round reported {metric!r}; rounds: {list(records)}")
    value = statistics.median_low([r[metric] for r in ok])
    return next(r for r in ok if r[metric] == value)


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    """Wall seconds of one call, and its result."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


class Bench:
    """One benchmark run: the thread pin, the rounds, the load readings, the JSON and the verdict."""

    def __init__(self, name: str, args: argparse.Namespace, config: dict[str, Any] | None = None,
                 log: Callable[[str], None] = print) -> None:
        self.name, self.args, self.config, self.log = name, args, dict(config or {}), log
        self.threads = int(args.threads)
        self.allow_noisy = bool(args.allow_noisy)
        self.cores = core_count()
        self.loads: list[dict[str, Any]] = []
        self.contender_threads: dict[str, dict[str, Any]] = {}
        self._cpu: tuple[float, float, float] | None = None  # (wall, all CPU, own CPU) at the last reading
        pin_threads(self.threads)
        self.read_load("start")

    def read_load(self, when: str, round_index: int | None = None) -> tuple[float, float, float]:
        reading = tuple(load_average())
        entry: dict[str, Any] = {"when": when, "round": round_index, "load": list(reading)}
        times, now = cpu_times(), time.monotonic()
        others = None
        if times is not None:
            if self._cpu is not None and now > self._cpu[0]:
                wall, busy, own = self._cpu
                others = max(0.0, (times[0] - busy) - (times[1] - own)) / (now - wall)
                entry["others_cores"] = others
            self._cpu = (now, *times)
        if when == "start" or times is None:
            entry["noisy"] = is_noisy([reading], self.cores)
            why = f"load average {reading[0]:.2f} exceeds the {self.cores} cores of this machine"
        else:
            entry["noisy"] = others is not None and others > OTHERS_LIMIT
            why = (f"other processes kept {others:.2f} cores busy since the last reading (more than {OTHERS_LIMIT})"
                   if others is not None else "")
        self.loads.append(entry)
        if entry["noisy"] and not self.allow_noisy:
            raise Refused(self._refusal(why))
        return reading

    def _refusal(self, why: str) -> str:
        return (f"{self.name}: refused: {why}, so the figures would measure the other jobs. Rerun on a quiet "
                "machine, or pass --allow-noisy to write them marked noisy (never for the README).")

    @property
    def noisy(self) -> bool:
        return any(r.get("noisy", False) for r in self.loads)

    def run(self, contenders: dict[str, Callable[[], dict[str, Any]]], metric: str | dict[str, str],
            rounds: int | None = None, tag: str = "") -> dict[str, dict[str, Any]]:
        """Run every contender once per round, in rotating order, and summarise each by its median round.

        Each contender is a zero-argument callable returning one round's figures (a dict with
        ``metric``, or ``metric[name]`` when it is a dict); warm-up belongs in building it, not in
        the call. The result maps a name to ``{**median_round, "rounds": [...]}``; a contender whose every round failed
        keeps its last record (with its ``error``).
        """
        rounds = int(self.args.rounds if rounds is None else rounds)
        if rounds < 1:
            raise SystemExit(f"--rounds must be >= 1, got {rounds}.")
        names = list(contenders)
        records: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
        for i in range(rounds):
            order = round_order(names, i)
            self.read_load("before", i)
            for name in order:
                self.log(f"{self.name}{' ' + tag if tag else ''}: round {i + 1}/{rounds}: {name} ...")
                pin_threads(self.threads)
                rec = dict(contenders[name]())
                rec["round"] = i
                records[name].append(rec)
                state = thread_state()
                key = f"{tag}:{name}" if tag else name
                changed = state.get("torch_num_threads", self.threads) != self.threads
                state["changed_by_contender"] = changed or self.contender_threads.get(key, {}).get(
                    "changed_by_contender", False)  # in any round
                self.contender_threads[key] = state
            self.read_load("after", i)
            self.loads[-1]["order"] = order
        out = {}
        for name, recs in records.items():
            key = metric[name] if isinstance(metric, dict) else metric
            try:
                best = median_round(recs, key)
            except ValueError:
                out[name] = {**recs[-1], "rounds": recs}
                continue
            out[name] = {**best, "median_of": key, "rounds": recs}
        return out

    def header(self) -> str:
        peak = max(r["load"][0] for r in self.loads)
        others = [r["others_cores"] for r in self.loads if "others_cores" in r]
        head = (f"{self.name}: threads {self.threads} for every contender, median of {self.args.rounds} alternating "
                f"rounds, load average <= {peak:.2f} on {self.cores} cores"
                + (f", other processes <= {max(others):.2f} cores" if others else ""))
        if self.noisy:
            head = "NOISY (a loaded machine; not for the README)\n" + head
        return head

    def finish(self, results: Any, table: Iterable[str] = (), json_path: Path | str | None = None,
               ok: bool = True) -> int:
        """Print the table and write the JSON, or refuse; returns the exit status."""
        self.read_load("end")  # raises SystemExit on a loaded machine without --allow-noisy
        noisy = self.noisy
        print(self.header())
        for line in table:
            print(line)
        if noisy:
            print("NOISY: these figures were taken on a loaded machine.")
        report = {"benchmark": self.name, "noisy": noisy, "threads": self.threads, "rounds": self.args.rounds,
                  "summary": "median round of the alternating rounds (all rounds kept)",
                  "cores": self.cores, "load_average": self.loads, "contender_threads": self.contender_threads,
                  "versions": versions(),
                  "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                              "python": platform.python_version()},
                  "config": self.config, "results": results}
        if json_path:
            path = Path(json_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(report, indent=2, default=_jsonable) + "\n")
        return 0 if ok else 1


def _jsonable(x: Any) -> Any:
    if hasattr(x, "tolist"):
        return x.tolist()
    return float(x)


def add_arguments(p: argparse.ArgumentParser, rounds: int = 3) -> None:
    """The options every benchmark shares."""
    p.add_argument("--threads", type=int, default=1,
                   help="threads for every contender: torch, BLAS (OMP/MKL/OpenBLAS) and XLA (PJRT_NPROC) (default 1)")
    p.add_argument("--rounds", "--repeats", type=int, default=rounds, dest="rounds",
                   help=f"alternating rounds; the median round is reported (default {rounds}; --repeats is the old "
                        "name)")
    p.add_argument("--allow-noisy", action="store_true",
                   help="report even on a loaded machine (the JSON says noisy: true)")
    p.add_argument("--json", type=Path, metavar="PATH", help="write the figures here")


# -- roofline -----------------------------------------------------------------------------------

def matmul_contender(backend: str, n: int = 2048, repeats: int = 3) -> Callable[[], dict[str, Any]]:
    """A contender measuring fp32 ``[n, n] @ [n, n]`` FLOP/s (``2 n^3`` per product) on one backend.

    This is the machine's roofline at the pinned thread count, measured in the same run as the
    model, so FLOP utilisation = achieved model FLOP/s / this.
    """
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    if backend == "numpy":
        step = lambda: a @ b
    elif backend == "torch":
        import torch

        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        step = lambda: torch.mm(ta, tb)
    elif backend == "jax":
        import jax
        import jax.numpy as jnp

        ja, jb = jnp.asarray(a), jnp.asarray(b)
        mm = jax.jit(lambda x, y: jnp.matmul(x, y, precision="highest"))
        step = lambda: mm(ja, jb).block_until_ready()
    else:
        raise ValueError(f"unknown matmul backend {backend!r}; use numpy, torch or jax.")
    step()  # warm-up (compilation, thread pools)

    def run() -> dict[str, Any]:
        seconds, _ = timed(lambda: [step() for _ in range(repeats)])
        return {"seconds": seconds / repeats, "flops_per_s": 2 * n ** 3 * repeats / seconds, "n": n}

    return run


# -- model FLOPs --------------------------------------------------------------------------------

def matmul_params(spec: Any) -> int:
    """Weights that take part in a matmul per token: q, k, v, o, gate, up, down in every layer and the LM head.

    The embedding is a lookup (no FLOPs); norms and biases add O(hidden) per token and are left out.
    The LM head counts even when tied to the embedding: it is still a ``[vocab, hidden]`` matmul.
    """
    h, i, q, kv = spec.hidden_size, spec.intermediate_size, spec.q_dim, spec.kv_dim
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * i
    return spec.num_hidden_layers * per_layer + spec.vocab_size * h


def causal_forward_flops(spec: Any, seq_len: int) -> float:
    """FLOPs of one causal forward over ``seq_len`` tokens of a decoder.

    ``2 * P * S + 2 * L * q_dim * S * (S + 1)`` where ``P`` = :func:`matmul_params`, ``S`` = seq_len,
    ``L`` = layers and ``q_dim`` = heads x head_dim: a matmul costs 2 FLOPs per weight per token,
    and the token at position ``p`` attends ``p + 1`` keys at ``2 * q_dim`` FLOPs each for
    ``q . k`` and as many for ``softmax @ v`` (``4 * L * q_dim * sum(p + 1)``).
    """
    s = float(seq_len)
    return 2.0 * matmul_params(spec) * s + 2.0 * spec.num_hidden_layers * spec.q_dim * s * (s + 1)


def decode_flops(spec: Any, prompt_lens: Iterable[int], new_tokens: int) -> float:
    """Model FLOPs to generate ``new_tokens`` after each prompt with a KV cache.

    The prefill gives the first new token and each of the other ``new_tokens - 1`` is one cached
    forward at the next position, so a row costs a causal forward over ``prompt + new_tokens - 1``
    tokens. Real prompt lengths count, not the left padding.
    """
    return sum(causal_forward_flops(spec, p + new_tokens - 1) for p in prompt_lens)


def train_flops(spec: Any, seq_lens: Iterable[int]) -> float:
    """Model FLOPs of a forward + backward over sequences: 3x the forward (the backward is ~2x)."""
    return 3.0 * sum(causal_forward_flops(spec, s) for s in seq_lens)


def grpo_step_flops(spec: Any, prompt_lens: Iterable[int], completion_lens: Iterable[int]) -> float:
    """Model FLOPs of one GRPO step: generate each completion, then train on prompt + completion.

    ``decode_flops`` of every sequence plus ``train_flops`` of prompt + completion; the old-policy
    log-prob forward is not counted (only the work the algorithm needs at ``num_iterations=1``,
    where TRL skips it), so utilisation compares frameworks on the same numerator.
    """
    total = 0.0
    for p, c in zip(prompt_lens, completion_lens):
        if c > 0:
            total += causal_forward_flops(spec, p + c - 1)
        total += train_flops(spec, [p + c])
    return total
