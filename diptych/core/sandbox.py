"""Run model-written code in a throwaway jail that the operating system enforces.

Code rewards execute whatever the policy wrote, and an RL policy will find every way to loop, fork,
allocate, write, read or connect that its environment allows. An in-Python guard (an audit hook)
cannot hold it: the program can rewrite the guard's state or call what the hook never sees
(``os.open(dir_fd=...)``, ``_posixsubprocess.fork_exec``, ``os.mkfifo``). So the default, ``strict``
isolation is done by the kernel (see ``sandbox_launcher.py``, which builds it):

Guaranteed (strict):
- fresh user, mount, PID, network, IPC and UTS namespaces; as root the program's uid maps to an
  unprivileged uid of its own (one per concurrent sandbox, so RLIMIT_NPROC separates fork bombs);
- the filesystem is a fresh, read-only tmpfs holding only read-only binds of the interpreter, its
  standard library (site-packages masked), the system's shared libraries (``/usr/lib``...) and
  ``/dev/null``, ``zero``, ``full``, ``random``, ``urandom``; the working directory (``/sandbox``) and
  ``/tmp`` are private size-capped tmpfs mounts that vanish with the run. ``/etc``, ``/home``, ``/root``
  (beyond the interpreter's own files), the repo, the venv and ``/proc`` are not there; ``/usr/bin``
  (programs to run) only with ``allow_spawn=True`` or :func:`run_command`;
- no network: the new network namespace has only a loopback that is down;
- no capabilities after exec (empty bounding set), ``no_new_privs``, and on x86-64 a seccomp filter
  refusing ptrace, mount, pivot_root, chroot, unshare/setns and namespace-creating clone, keyrings, bpf,
  perf_event_open, userfaultfd, io_uring, kernel modules, kexec, process_vm_*, handle-based opens,
  and sockets other than AF_UNIX;
- rlimits (CPU seconds, address space, processes, file size, no core dumps), a wall-clock timeout
  that kills the launcher's process group (and so, through the PID namespace, every descendant),
  a clean environment.

Not guaranteed: protection from kernel bugs (the program still talks to the host kernel, through a
smaller door), from CPU/memory side channels, or from exhausting shared resources that have no rlimit
here (disk is bounded by the tmpfs size, memory by RLIMIT_AS per process times the process limit).
Whatever the program prints is untrusted data; callers must not act on it (see the code reward).

Where the kernel cannot do this (no unprivileged user namespaces, macOS, a non-x86-64 machine) the
sandbox REFUSES to run and says what is missing, unless the caller opts in to ``weak`` isolation
(``SandboxLimits(isolation="weak")`` or ``DIPTYCH_SANDBOX=weak``): rlimits, ``unshare`` where it
works, and the in-Python audit hook, which stops accidents but not a program that wants out.

The launcher is a fresh interpreter we exec first, never a ``preexec_fn``: Python code between fork
and exec in a multithreaded parent (JAX/XLA, torch, the reward thread pool) can deadlock on a lock
some other thread held at fork time. Without ``preexec_fn``, ``subprocess`` starts the child in C.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

WEAK_ENV = "DIPTYCH_SANDBOX"  # set to "weak" to accept the in-Python guard where the kernel cannot isolate
_LAUNCHER_FILE = Path(__file__).with_name("sandbox_launcher.py")
_STRICT_ARCHES = ("x86_64",)
_WORKDIR = "/sandbox"

NOBODY = 65534
# When we run as root each concurrent sandbox gets its own unprivileged uid from this range, because
# RLIMIT_NPROC counts per user: a fork bomb in one sandbox must not starve its neighbours.
_UID_POOL = range(64000, 64512)
_uid_lock = threading.Lock()
_uids_in_use: set[int] = set()

# Weak isolation only: installed before the user's program inside the sandboxed interpreter (stdlib only).
# It stops accidents, not intent: the program can switch it off (see the module docstring).
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

# Weak isolation only: the first program the sandbox starts (``python -I -S -c _LAUNCHER <limits> <argv...>``):
# a fresh single-threaded interpreter that applies the rlimits to itself and then becomes ``argv`` (the unshare
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
    # "strict": kernel isolation or refuse; "weak": fall back to the in-Python guard where the kernel cannot
    isolation: str = "strict"

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.memory_mb <= 0 or self.max_processes <= 0 or self.max_output_bytes <= 0:
            raise ValueError(f"SandboxLimits must be positive, got {self}.")
        if self.isolation not in ("strict", "weak"):
            raise ValueError(f"SandboxLimits.isolation must be 'strict' or 'weak', got {self.isolation!r}.")


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

    prefix: tuple[str, ...]  # weak: the unshare command line put in front of the program (plus --setuid)
    python: str  # an interpreter the sandbox user can execute
    network: bool
    pid_namespace: bool
    drops_root: bool
    kind: str = "weak"  # "namespaces" (strict, kernel-enforced) or "weak"
    seccomp: bool = False


def _can_run(prefix: Sequence[str], exe: str) -> bool:
    try:
        out = subprocess.run([*prefix, exe, "-I", "-S", "-c", "pass"], capture_output=True, timeout=10, env={},
                             cwd="/")
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0


@functools.lru_cache(maxsize=1)
def _weak_isolation() -> Isolation:
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


def _under(path: str, dirs: Sequence[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in dirs)


@functools.lru_cache(maxsize=2)
def _view(spawn: bool) -> tuple[str, tuple[tuple[str, str], ...], tuple[tuple[str, str], ...], tuple[str, ...]]:
    """What the jail shows, read-only: ``(python, binds, symlinks, masks)``; binds are ``(path, dir|file|dev)``.

    Only the interpreter, its standard library and the shared libraries; ``/usr/bin`` only when the
    program may start others. Host paths keep their names (the interpreter finds its prefix and its
    libpython by absolute path), but nothing else of their parents is visible.
    """
    python = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    dirs = [d for d in ("/usr/lib", "/usr/lib64", "/usr/lib32") if os.path.isdir(d) and not os.path.islink(d)]
    top = ["/lib", "/lib64", "/lib32"] + (["/bin", "/sbin"] if spawn else [])
    if spawn:
        dirs += [d for d in ("/usr/bin", "/usr/sbin", "/usr/libexec") if os.path.isdir(d) and not os.path.islink(d)]
    symlinks = []
    for d in top:
        if os.path.islink(d):
            symlinks.append((d, os.readlink(d)))
        elif os.path.isdir(d):
            dirs.append(d)
    base = {"base": sys.base_prefix, "platbase": sys.base_exec_prefix, "installed_base": sys.base_prefix,
            "installed_platbase": sys.base_exec_prefix}
    paths = sysconfig.get_paths(vars=base)
    libdir = sysconfig.get_config_var("LIBDIR") or os.path.join(sys.base_prefix, "lib")
    stdlib = [os.path.realpath(paths[k]) for k in ("stdlib", "platstdlib")]
    files = [python, *sorted(glob.glob(os.path.join(libdir, "libpython*.so*")))]
    binds: list[tuple[str, str]] = [(d, "dir") for d in dirs]
    for d in stdlib:
        if not _under(d, [b for b, _ in binds]):
            binds.append((d, "dir"))
    for f in files:
        if os.path.isfile(f) and not _under(f, [b for b, k in binds if k == "dir"]):
            binds.append((f, "file"))
    devices = ("null", "zero", "full", "random", "urandom")
    binds += [(f"/dev/{d}", "dev") for d in devices if os.path.exists(f"/dev/{d}")]
    site = {sysconfig.get_paths(vars=base)[k] for k in ("purelib", "platlib")} | {"/usr/lib/python3/dist-packages"}
    masks = tuple(sorted(p for p in site if os.path.isdir(p) and _under(p, [b for b, k in binds if k == "dir"])))
    return python, tuple(binds), tuple(symlinks), masks


@functools.lru_cache(maxsize=1)
def _namespace_problem() -> str | None:
    """Why strict isolation cannot run here, or None; found once by starting a real jail."""
    if not sys.platform.startswith("linux"):
        return f"kernel namespaces and seccomp need Linux, this is {sys.platform}"
    if platform.machine() not in _STRICT_ARCHES:
        return f"the seccomp filter knows {', '.join(_STRICT_ARCHES)} syscalls only, this is {platform.machine()}"
    r = _run_strict([_view(False)[0], "-I", "-S", "-c", "print('ok')"], "", SandboxLimits(timeout_s=20), {},
                    spawn=False)
    if r.returncode == 0 and r.stdout.strip() == "ok":
        return None
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    return lines[-1] if lines else f"the probe jail exited with {r.returncode}"


def isolation(mode: str | None = None) -> Isolation:
    """The isolation runs get here: kernel namespaces + seccomp, else (only if asked for) the weak guard.

    Raises when the kernel cannot isolate and neither ``mode="weak"`` nor ``DIPTYCH_SANDBOX=weak`` allows less.
    """
    problem = _namespace_problem()
    if problem is None:
        return Isolation((), _view(False)[0], True, True, True, kind="namespaces", seccomp=True)
    if mode == "weak" or os.environ.get(WEAK_ENV, "").strip().lower() == "weak":
        return _weak_isolation()
    raise RuntimeError(
        f"sandbox: the kernel cannot isolate programs here ({problem}); refusing to run untrusted code. "
        "Enable unprivileged user namespaces (sysctl user.max_user_namespaces>0, kernel.unprivileged_userns_clone=1"
        f", no AppArmor userns restriction), or accept the bypassable in-Python guard with "
        f"SandboxLimits(isolation='weak') or {WEAK_ENV}=weak.")


def _check_files(files: Mapping[str, str] | None) -> None:
    for name in files or {}:
        norm = os.path.normpath(name)
        if os.path.isabs(name) or norm == ".." or norm.startswith("../") or norm == ".":
            raise ValueError(f"sandbox file name {name!r} escapes the working directory; use a relative name.")


def _kill_uid(uid: int) -> None:
    """SIGKILL whatever still runs as ``uid`` (belt and braces: the PID namespace should have taken it)."""
    for status in Path("/proc").glob("[0-9]*/status"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            uid_line = next(line for line in status.read_text().splitlines() if line.startswith("Uid:"))
            if int(uid_line.split()[1]) == uid:
                os.kill(int(status.parent.name), signal.SIGKILL)


def _execute(cmd: list[str], stdin: str, limits: SandboxLimits, cwd: Path, env: Mapping[str, str],
             io_dir: Path) -> SandboxResult:
    """Start ``cmd`` in its own session, stop it at the timeout, and return its capped output."""
    (io_dir / "stdin").write_text(stdin, encoding="utf-8")
    start = time.monotonic()
    timed_out = False
    with open(io_dir / "stdin", "rb") as fin, open(io_dir / "stdout", "wb") as fout, \
            open(io_dir / "stderr", "wb") as ferr:
        # No preexec_fn (see the module docstring): setsid, cwd, env and fds are done by subprocess in C.
        proc = subprocess.Popen(cmd, stdin=fin, stdout=fout, stderr=ferr, cwd=cwd, env=dict(env),
                                start_new_session=True, close_fds=True)
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
    stderr = "".join(line for line in stderr.splitlines(keepends=True) if not line.startswith("unshare: sigprocmask"))
    return SandboxResult(proc.returncode, stdout, stderr, timed_out, t1 or t2, duration)


def _run_strict(argv: list[str], stdin: str, limits: SandboxLimits, files: Mapping[str, str],
                spawn: bool) -> SandboxResult:
    _, binds, symlinks, masks = _view(spawn)
    uid = _take_uid() if os.geteuid() == 0 else -1
    root = Path(tempfile.mkdtemp(prefix="diptych-sandbox-"))  # only the jail's mount point; stays empty here
    io_dir = Path(tempfile.mkdtemp(prefix="diptych-sandbox-io-"))
    try:
        root.chmod(0o755)  # the jail's builder runs as the sandbox uid and must reach its mount point
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": _WORKDIR, "TMPDIR": "/tmp",
               "PYTHONIOENCODING": "utf-8", "PYTHONDONTWRITEBYTECODE": "1"}
        size_mb = max(64, 4 * limits.max_file_mb) + sum(len(t.encode()) for t in files.values()) // 2**20 + 1
        cfg = {"root": str(root), "workdir": _WORKDIR, "tmpfs_mb": size_mb, "binds": binds, "symlinks": symlinks,
               "masks": masks, "files": dict(files), "argv": argv, "env": env, "seccomp": True,
               "uid": uid if uid >= 0 else os.geteuid(), "gid": uid if uid >= 0 else os.getegid(),
               "rlimits": _rlimits(limits, limits.max_processes)}
        (io_dir / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
        launcher = [os.path.realpath(sys.executable), "-I", "-S", str(_LAUNCHER_FILE), str(io_dir / "config.json")]
        return _execute(launcher, stdin, limits, io_dir, env, io_dir)
    finally:
        if uid >= 0:
            _kill_uid(uid)
            _release_uid(uid)
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(io_dir, ignore_errors=True)


def _run_weak(argv: Sequence[str], stdin: str, limits: SandboxLimits, files: Mapping[str, str]) -> SandboxResult:
    iso = _weak_isolation()
    uid = -1
    work = Path(tempfile.mkdtemp(prefix="diptych-sandbox-"))
    io_dir = Path(tempfile.mkdtemp(prefix="diptych-sandbox-io-"))  # outside the sandbox's reach
    try:
        for name, text in files.items():
            target = work / name
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
            nproc = limits.max_processes + (_tasks_of(os.geteuid()) if os.geteuid() != 0 else 0)
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(work),
               "PYTHONIOENCODING": "utf-8", "PYTHONDONTWRITEBYTECODE": "1"}
        return _execute(_launcher_argv(iso.python, limits, nproc, [*prefix, *argv]), stdin, limits, work, env, io_dir)
    finally:
        if uid >= 0:
            _release_uid(uid)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(io_dir, ignore_errors=True)


def run_command(argv: Sequence[str], stdin: str = "", limits: SandboxLimits | None = None,
                files: Mapping[str, str] | None = None) -> SandboxResult:
    """Run ``argv`` (its first element is looked up on a minimal PATH) inside the sandbox.

    ``files`` are written into the fresh working directory first (name -> text). Never raises for
    anything the program does; bad arguments raise ValueError, a machine that cannot isolate RuntimeError.
    """
    limits = limits or SandboxLimits()
    if not argv:
        raise ValueError("run_command needs a non-empty argv.")
    _check_files(files)
    if isolation(limits.isolation).kind == "namespaces":
        return _run_strict(list(argv), stdin, limits, files or {}, spawn=True)
    return _run_weak(argv, stdin, limits, files or {})


def run_python(code: str, stdin: str = "", limits: SandboxLimits | None = None,
               files: Mapping[str, str] | None = None) -> SandboxResult:
    """Run Python source as ``main.py`` in the sandbox's working directory (isolated mode, no site-packages)."""
    limits = limits or SandboxLimits()
    if not isinstance(code, str):
        raise TypeError(f"run_python needs the program as a str, got {type(code).__name__}.")
    _check_files(files)
    iso = isolation(limits.isolation)
    if iso.kind == "namespaces":
        return _run_strict([iso.python, "-I", "-S", "-B", "main.py"], stdin, limits, {**(files or {}), "main.py": code},
                           spawn=limits.allow_spawn)
    guard = f"ALLOW_SPAWN = {limits.allow_spawn!r}\n" + _GUARD
    all_files = {**(files or {}), "main.py": code, ".guard.py": guard}
    return _run_weak([iso.python, "-I", "-S", "-B", ".guard.py"], stdin, limits, all_files)
