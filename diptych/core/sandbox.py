"""Run model-written code in a throwaway process that cannot hurt the trainer.

Code rewards execute whatever the policy wrote, and an RL policy will find every way to loop,
fork, allocate or write that its environment allows. Each run therefore gets, in layers:

- kernel limits (``resource`` rlimits): CPU seconds, address space, process count, file size (which
  also caps captured output), no core dumps. They are set by a tiny launcher that we exec first and
  that then execs the program, never in a ``preexec_fn``: Python code between fork and exec in a
  multithreaded parent (JAX/XLA, torch, the reward thread pool) can deadlock on a lock some other
  thread held at fork time, and JAX warns about exactly that. Without ``preexec_fn``, ``subprocess``
  starts the child entirely in C (vfork/exec), running no Python and no at-fork hooks in the parent;
- a new session, killed as a group on the wall-clock timeout, so the caller always gets control back;
- a clean environment (no inherited variables, so no secrets) and a fresh temporary working directory;
- where ``unshare`` allows (Linux): new network, PID and mount namespaces (no network, a private
  ``/proc`` that hides the parent, every descendant dies with the sandbox), and when we run as root
  a drop to user ``nobody`` (root ignores the process-count limit and can write anywhere);
- inside Python, an audit hook that refuses writes outside the working directory, spawning
  programs, and ``ctypes`` (the usual way around an audit hook).

Best effort: without ``unshare`` (macOS, locked-down containers) there is no network isolation
and no PID namespace; :func:`isolation` says what this machine enforces. Treat it as a fence for
buggy and reward-hacking code, not a security boundary against a determined attacker.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

NOBODY = 65534
# When we run as root each concurrent sandbox gets its own unprivileged uid from this range, because
# RLIMIT_NPROC counts per user: a fork bomb in one sandbox must not starve its neighbours.
_UID_POOL = range(64000, 64512)
_uid_lock = threading.Lock()
_uids_in_use: set[int] = set()

# Installed before the user's program; runs inside the sandboxed interpreter (stdlib only).
_GUARD = r'''
import os, sys
_root = os.path.realpath(os.getcwd())
_WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_PATH_EVENTS = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.symlink",
                "os.link", "os.truncate", "os.utime", "shutil.rmtree", "shutil.move", "shutil.copyfile"}
_SPAWN = ("subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "pty.spawn")
def _inside(p):
    if isinstance(p, int):
        return True
    p = os.fsdecode(p)
    if p == "/dev/null":
        return True
    r = os.path.realpath(os.path.join(_root, p))
    return r == _root or r.startswith(_root + os.sep)
def _guard(event, args):
    if event == "open":
        path, mode, flags = args
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (flags or 0) & _WRITE
        if writing and not _inside(path):
            raise PermissionError(f"sandbox: writing outside the working directory is not allowed: {path!r}")
    elif event in _PATH_EVENTS:
        for a in args[:2]:
            if isinstance(a, (str, bytes, os.PathLike)) and not _inside(a):
                raise PermissionError(f"sandbox: {event} outside the working directory is not allowed: {a!r}")
    elif event.startswith(_SPAWN) and not ALLOW_SPAWN:
        raise PermissionError(f"sandbox: starting programs is not allowed ({event})")
    elif event.startswith("ctypes."):
        raise PermissionError("sandbox: ctypes is not allowed")
sys.addaudithook(_guard)
del _guard
sys.argv = ["main.py"]
_src = open("main.py", encoding="utf-8").read()
_g = {"__name__": "__main__", "__file__": "main.py", "__builtins__": __builtins__}
exec(compile(_src, "main.py", "exec"), _g)
'''

# The first program the sandbox starts (``python -I -S -c _LAUNCHER <limits json> <argv...>``): a fresh
# single-threaded interpreter that applies the rlimits to itself and then becomes ``argv`` (the unshare
# prefix, which does the namespaces and the drop to an unprivileged uid, then the program). Limits
# survive exec, so this is exactly what a preexec_fn did, minus running Python in a forked parent.
_LAUNCHER = r"""
import json, os, resource, sys
for name, soft, hard in json.loads(sys.argv[1]):
    resource.setrlimit(getattr(resource, name), (soft, hard))
argv = sys.argv[2:]
try:
    os.execvp(argv[0], argv)
except OSError as e:
    sys.stderr.write(f"sandbox: cannot start {argv[0]!r}: {e}\n")
    sys.stderr.flush()
    os._exit(127)
"""


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    """Per-run limits; defaults suit unit-test-sized programs (a reward call runs many of them)."""

    timeout_s: float = 5.0  # wall clock, the hard stop
    cpu_s: int | None = None  # CPU seconds; default: timeout rounded up, plus one
    memory_mb: int = 512  # address space (RLIMIT_AS)
    max_processes: int = 32  # RLIMIT_NPROC, enforced for non-root users only (hence the drop to nobody)
    max_file_mb: int = 16  # largest file the program may write, stdout and stderr included
    max_output_bytes: int = 64_000  # stdout / stderr kept for the caller
    allow_spawn: bool = False  # let Python code start other programs (subprocess, os.system)

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.memory_mb <= 0 or self.max_processes <= 0 or self.max_output_bytes <= 0:
            raise ValueError(f"SandboxLimits must be positive, got {self}.")


@dataclasses.dataclass
class SandboxResult:
    """What happened; ``ok`` means exited 0 within every limit."""

    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    truncated: bool
    duration_s: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    @property
    def signal(self) -> str | None:
        """Name of the signal that ended the program (SIGKILL on timeout, SIGXCPU on the CPU limit...)."""
        if self.returncode is not None and self.returncode < 0:
            return signal.Signals(-self.returncode).name
        return None


@dataclasses.dataclass(frozen=True)
class Isolation:
    """What the kernel enforces here, found once by probing (see :func:`isolation`)."""

    prefix: tuple[str, ...]  # the unshare command line put in front of the program (plus --setuid when dropping)
    python: str  # an interpreter the sandbox user can execute
    network: bool
    pid_namespace: bool
    drops_root: bool


def _can_run(prefix: Sequence[str], exe: str) -> bool:
    try:
        out = subprocess.run([*prefix, exe, "-I", "-S", "-c", "pass"], capture_output=True, timeout=10, env={},
                             cwd="/")
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0


@functools.lru_cache(maxsize=1)
def isolation() -> Isolation:
    """Probe, most isolated first: namespaces + drop to nobody (root), user namespaces, plain process."""
    unshare = shutil.which("unshare")
    exes = list(dict.fromkeys(p for p in (sys.executable, shutil.which("python3"), "/usr/bin/python3")
                              if p and os.path.exists(p)))
    full = ["--net", "--pid", "--fork", "--kill-child", "--mount-proc"]
    candidates: list[tuple[list[str], bool, bool, bool]] = []
    if unshare and sys.platform.startswith("linux"):
        if os.geteuid() == 0:
            candidates.append(([unshare, *full], True, True, True))
        candidates.append(([unshare, "--map-root-user", *full], True, True, False))
        candidates.append(([unshare, "--map-root-user", "--net"], True, False, False))
    candidates.append(([], False, False, False))
    for prefix, net, pid, drop in candidates:
        for exe in exes:
            if _can_run(prefix + (_as_user(NOBODY) if drop else []), exe):
                return Isolation(tuple(prefix), exe, net, pid, drop)
    raise RuntimeError(f"sandbox: no Python interpreter can be started (tried {exes}).")


def _as_user(uid: int) -> list[str]:
    return ["--setgid", str(uid), "--setuid", str(uid)]


def _take_uid() -> int:
    with _uid_lock:
        start = os.getpid() % len(_UID_POOL)  # spread concurrent processes over the pool too
        for k in range(len(_UID_POOL)):
            uid = _UID_POOL[(start + k) % len(_UID_POOL)]
            if uid not in _uids_in_use:
                _uids_in_use.add(uid)
                return uid
    return NOBODY


def _release_uid(uid: int) -> None:
    with _uid_lock:
        _uids_in_use.discard(uid)


def _tasks_of(uid: int) -> int:
    """Processes and threads owned by ``uid``: what RLIMIT_NPROC counts against."""
    count = 0
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            text = status.read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        if int(fields.get("Uid", "-1 0").split()[0]) == uid:
            count += int(fields.get("Threads", "1").strip() or 1)
    return count


def _rlimits(limits: SandboxLimits, nproc: int) -> list[tuple[str, int, int]]:
    """``(resource name, soft, hard)`` rows for the launcher; names, not numbers, so nothing is platform-coded."""
    cpu = limits.cpu_s if limits.cpu_s is not None else math.ceil(limits.timeout_s) + 1
    mem = limits.memory_mb * 1024 * 1024
    fsize = max(limits.max_file_mb * 1024 * 1024, limits.max_output_bytes + 1)
    return [("RLIMIT_CPU", cpu, cpu + 1), ("RLIMIT_AS", mem, mem), ("RLIMIT_NPROC", nproc, nproc),
            ("RLIMIT_FSIZE", fsize, fsize), ("RLIMIT_CORE", 0, 0)]


def _launcher_argv(python: str, limits: SandboxLimits, nproc: int, argv: Sequence[str]) -> list[str]:
    return [python, "-I", "-S", "-c", _LAUNCHER, json.dumps(_rlimits(limits, nproc)), *argv]


def _read_capped(path: Path, cap: int) -> tuple[str, bool]:
    with open(path, "rb") as f:
        data = f.read(cap + 1)
    return data[:cap].decode("utf-8", errors="replace"), len(data) > cap


def run_command(argv: Sequence[str], stdin: str = "", limits: SandboxLimits | None = None,
                files: Mapping[str, str] | None = None) -> SandboxResult:
    """Run ``argv`` (its first element is looked up on a minimal PATH) inside the sandbox.

    ``files`` are written into the fresh working directory first (name -> text). The directory
    is deleted afterwards. Never raises for anything the program does; only bad arguments raise.
    """
    limits = limits or SandboxLimits()
    if not argv:
        raise ValueError("run_command needs a non-empty argv.")
    iso = isolation()
    uid = -1
    work = Path(tempfile.mkdtemp(prefix="diptych-sandbox-"))
    io_dir = Path(tempfile.mkdtemp(prefix="diptych-sandbox-io-"))  # outside the sandbox's reach
    try:
        for name, text in (files or {}).items():
            target = (work / name).resolve()
            if work.resolve() not in target.parents:
                raise ValueError(f"sandbox file name {name!r} escapes the working directory; use a relative name.")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
        prefix = list(iso.prefix)
        if iso.drops_root:
            uid = _take_uid()
            prefix += _as_user(uid)
            for p in [work, *work.rglob("*")]:
                os.chown(p, uid, uid)
            nproc = limits.max_processes
        else:
            # Without a uid of its own the sandbox shares our user's count (threads included), so the
            # limit is what we already run plus the sandbox's allowance.
            uid = -1
            nproc = limits.max_processes + (_tasks_of(os.geteuid()) if os.geteuid() != 0 else 0)
        (io_dir / "stdin").write_text(stdin, encoding="utf-8")
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(work),
               "PYTHONIOENCODING": "utf-8", "PYTHONDONTWRITEBYTECODE": "1"}
        start = time.monotonic()
        timed_out = False
        with open(io_dir / "stdin", "rb") as fin, open(io_dir / "stdout", "wb") as fout, \
                open(io_dir / "stderr", "wb") as ferr:
            # No preexec_fn (see the module docstring): setsid, cwd, env and fds are done by subprocess in C,
            # the rlimits by the launcher in its own fresh process.
            proc = subprocess.Popen(_launcher_argv(iso.python, limits, nproc, [*prefix, *argv]), stdin=fin,
                                    stdout=fout, stderr=ferr, cwd=work, env=env, start_new_session=True,
                                    close_fds=True)
            try:
                proc.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                # Kill the whole group even after a normal exit: a daemonised grandchild must not outlive the run.
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        duration = time.monotonic() - start
        stdout, t1 = _read_capped(io_dir / "stdout", limits.max_output_bytes)
        stderr, t2 = _read_capped(io_dir / "stderr", limits.max_output_bytes)
        # util-linux 2.38 cannot re-raise some signals (SIGXCPU) after --fork and says so; that is our noise.
        stderr = "".join(line for line in stderr.splitlines(keepends=True)
                         if not line.startswith("unshare: sigprocmask"))
        return SandboxResult(proc.returncode, stdout, stderr, timed_out, t1 or t2, duration)
    finally:
        if uid >= 0:
            _release_uid(uid)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(io_dir, ignore_errors=True)


def run_python(code: str, stdin: str = "", limits: SandboxLimits | None = None,
               files: Mapping[str, str] | None = None) -> SandboxResult:
    """Run Python source as ``main.py`` in the sandbox (isolated mode, no site-packages, write guard on)."""
    limits = limits or SandboxLimits()
    if not isinstance(code, str):
        raise TypeError(f"run_python needs the program as a str, got {type(code).__name__}.")
    guard = f"ALLOW_SPAWN = {limits.allow_spawn!r}\n" + _GUARD
    all_files = {**(files or {}), "main.py": code, ".guard.py": guard}
    return run_command([isolation().python, "-I", "-S", "-B", ".guard.py"], stdin, limits, all_files)
