"""The sandbox contains what a reward-hacking policy writes: each case ends within its limit and we keep running."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from diptych.core.sandbox import SandboxLimits, isolation, run_command, run_python

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the sandbox needs a POSIX system")


def _pid_namespaces() -> dict[str, list[int]]:
    """PID namespace -> its processes, as seen from here."""
    spaces: dict[str, list[int]] = {}
    for p in Path("/proc").glob("[0-9]*"):
        try:
            spaces.setdefault(os.readlink(p / "ns" / "pid"), []).append(int(p.name))
        except OSError:
            continue
    return spaces


def test_runs_code_and_returns_output():
    r = run_python("import sys\nprint(sum(map(int, sys.stdin.read().split())))", stdin="1 2 3")
    assert r.ok and r.stdout == "6\n" and not r.truncated


def test_infinite_loop_is_killed_at_the_wall_clock_timeout():
    start = time.monotonic()
    r = run_python("while True:\n    pass", limits=SandboxLimits(timeout_s=1.0))
    elapsed = time.monotonic() - start
    assert r.timed_out and not r.ok and r.signal == "SIGKILL"
    assert elapsed < 2.5


def test_cpu_limit_stops_a_busy_program_before_the_wall_clock():
    # The wall-clock limit is generous so that only the CPU limit can stop it, even on a loaded machine.
    r = run_python("while True:\n    pass", limits=SandboxLimits(timeout_s=20.0, cpu_s=1))
    assert not r.ok and not r.timed_out
    assert r.duration_s < 20.0


def test_fork_bomb_is_contained_and_leaves_no_process_behind():
    code = (
        "import os\nprint(os.getcwd(), flush=True)\n"
        "while True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    )
    before = set(_pid_namespaces())
    start = time.monotonic()
    r = run_python(code, limits=SandboxLimits(timeout_s=1.5, max_processes=16))
    assert r.timed_out and time.monotonic() - start < 4.0
    assert r.stdout.split("\n")[0] == "/sandbox"
    # everything the bomb forked lived in the sandbox's own PID namespace, which dies with it (the kernel
    # reaps a namespace of many processes within moments, not at once)
    deadline = time.monotonic() + 3.0
    while (left := {ns: p for ns, p in _pid_namespaces().items() if ns not in before}) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert left == {}


def test_memory_bomb_fails_inside_the_sandbox():
    r = run_python("x = bytearray(4 * 1024**3)\nprint('allocated')", limits=SandboxLimits(memory_mb=256))
    assert not r.ok and "allocated" not in r.stdout and "MemoryError" in r.stderr


def test_writes_outside_the_working_directory_never_reach_the_host(tmp_path):
    # The host's tmp_path is not in the sandbox's view; its /tmp is a private tmpfs; its root is read-only.
    outside = [tmp_path / "escaped.txt", Path("/tmp") / f"diptych-escape-{os.getpid()}.txt"]
    code = "\n".join(
        f"try:\n    open({str(p)!r}, 'w').write('x')\n    print('private')\n"
        "except OSError as e:\n    print('refused', type(e).__name__)"
        for p in outside
    ) + "\nimport os\ntry:\n    os.open('../up.txt', os.O_CREAT | os.O_WRONLY)\n" \
        "except OSError as e:\n    print('refused', e)"
    code += "\nopen('inside.txt', 'w').write('fine')\nprint(open('inside.txt').read())"
    r = run_python(code)
    assert r.ok, r.stderr
    assert r.stdout.splitlines() == ["refused FileNotFoundError", "private",
                                     "refused [Errno 30] Read-only file system: '../up.txt'", "fine"]
    assert not any(p.exists() for p in outside)


def test_parent_environment_secrets_are_invisible(monkeypatch):
    monkeypatch.setenv("DIPTYCH_TEST_SECRET", "hunter2-secret")
    code = (
        "import os\nprint(dict(os.environ))\n"
        "for p in ('/proc/1/environ', f'/proc/{os.getppid()}/environ', '/proc/self/environ'):\n"
        "    try:\n        print(open(p, 'rb').read())\n    except OSError as e:\n        print('no', p)\n"
    )
    r = run_python(code)
    assert r.ok, r.stderr
    assert "hunter2-secret" not in r.stdout and "DIPTYCH_TEST_SECRET" not in r.stdout


def test_output_is_capped():
    r = run_python("print('x' * 10_000_000)", limits=SandboxLimits(max_output_bytes=1000))
    assert r.truncated and len(r.stdout) == 1000


def test_spawning_programs_is_refused_by_default():
    # no programs but the interpreter are in the sandbox's view unless asked for
    r = run_python("import subprocess\nsubprocess.run(['true'])")
    assert not r.ok and "No such file or directory: 'true'" in r.stderr
    shell = "import subprocess\nprint(subprocess.run(['sh', '-c', 'echo $((6 * 7))'], capture_output=True).stdout)"
    r = run_python(shell, limits=SandboxLimits(allow_spawn=True))
    assert r.ok and r.stdout == "b'42\\n'\n", r.stderr


def test_network_is_unreachable_where_namespaces_exist():
    if not isolation().network:
        pytest.skip("no network namespace on this machine (documented best effort)")
    code = "import socket\ntry:\n    socket.create_connection(('1.1.1.1', 53), timeout=1)\n    print('connected')\n" \
           "except OSError as e:\n    print('blocked', e.errno)"
    r = run_python(code)
    assert r.ok and "blocked" in r.stdout


def test_working_directory_is_fresh_and_removed():
    r1 = run_python("import os\nopen('state', 'w').write('1')\nprint(os.getcwd())")
    r2 = run_python("import os\nprint(os.path.exists('state'))")
    assert r2.stdout.strip() == "False"
    assert not Path(r1.stdout.strip()).exists()


def test_bad_arguments_raise_clearly():
    with pytest.raises(ValueError, match="escapes"):
        run_command(["true"], files={"../evil": "x"})
    with pytest.raises(ValueError, match="positive"):
        SandboxLimits(timeout_s=0)
    with pytest.raises(TypeError, match="str"):
        run_python(b"print(1)")  # type: ignore[arg-type]


def test_a_fork_bomb_does_not_starve_a_concurrent_sandbox():
    import threading

    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    t = threading.Thread(target=run_python, args=(bomb,), kwargs={"limits": SandboxLimits(timeout_s=1.5,
                                                                                          max_processes=16)})
    t.start()
    time.sleep(0.4)
    # a limit below the bomb's process count: with a shared uid the neighbour could not even start
    r = run_python("print('neighbour fine')", limits=SandboxLimits(max_processes=4))
    t.join()
    assert r.ok and r.stdout == "neighbour fine\n", r.stderr


def test_runs_from_a_multithreaded_process_without_forking_python(monkeypatch):
    """The trainer has JAX/XLA, torch and reward threads running: starting a sandbox must not run Python in a
    forked child (no preexec_fn), which can deadlock there and makes JAX warn "os.fork() was called"."""
    import importlib.util
    import subprocess
    import threading
    import warnings

    stop = threading.Event()

    def busy() -> None:
        while not stop.is_set():
            sum(range(1000))

    threads = [threading.Thread(target=busy, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    popen_kwargs: list[dict] = []
    real_popen = subprocess.Popen

    def recording_popen(*args, **kwargs):
        popen_kwargs.append(kwargs)
        return real_popen(*args, **kwargs)

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if importlib.util.find_spec("jax") is not None:
                import jax.numpy as jnp  # starts XLA's thread pool and installs JAX's at-fork warning hook

                assert float(jnp.ones((32, 32)).sum()) == 1024.0
            isolation()  # probed before recording: only the sandbox's own launch is checked below
            monkeypatch.setattr(subprocess, "Popen", recording_popen)
            results = [run_python("print('from a threaded parent')") for _ in range(3)]
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert all(r.ok and r.stdout == "from a threaded parent\n" for r in results), [r.stderr for r in results]
    assert popen_kwargs and all(kw.get("preexec_fn") is None for kw in popen_kwargs)
    fork_warnings = [str(w.message) for w in caught if "fork" in str(w.message).lower()]
    assert fork_warnings == []


def test_a_missing_program_is_reported_not_raised():
    r = run_command(["diptych-no-such-program"])
    assert not r.ok and r.returncode != 0


def test_the_requested_rlimits_reach_the_program():
    code = "import resource as r\nprint([r.getrlimit(getattr(r, n)) for n in ('RLIMIT_CPU', 'RLIMIT_AS', " \
           "'RLIMIT_FSIZE', 'RLIMIT_CORE')])"
    r = run_python(code, limits=SandboxLimits(timeout_s=2.5, memory_mb=300, max_file_mb=3))
    assert r.ok, r.stderr
    mb = 1024 * 1024
    # CPU default: the timeout rounded up, plus one second
    assert r.stdout.strip() == str([(4, 5), (300 * mb, 300 * mb), (3 * mb, 3 * mb), (0, 0)])


def test_without_kernel_isolation_the_sandbox_refuses_unless_weak_is_asked_for(monkeypatch):
    from diptych.core import sandbox

    monkeypatch.setattr(sandbox, "_namespace_problem", lambda: "unshare(user, ...) failed: Operation not permitted")
    monkeypatch.delenv(sandbox.WEAK_ENV, raising=False)
    with pytest.raises(RuntimeError, match=r"cannot isolate.*Operation not permitted.*isolation='weak'"):
        run_python("print('never runs')")
    with pytest.raises(RuntimeError, match="cannot isolate"):
        run_command(["true"])
    # explicit opt-in, per call or per process: the in-Python guard, which still stops the plain mistakes
    weak = run_python("print('weak')\nopen('/tmp/x-diptych-weak', 'w')", limits=SandboxLimits(isolation="weak"))
    assert weak.stdout == "weak\n" and "writing outside the working directory is not allowed" in weak.stderr
    assert isolation("weak").kind == "weak"
    monkeypatch.setenv(sandbox.WEAK_ENV, "weak")
    assert run_python("print(1 + 1)").stdout == "2\n"
    with pytest.raises(ValueError, match="'strict' or 'weak'"):
        SandboxLimits(isolation="none")


def test_this_machine_gets_kernel_isolation():
    """CI and dev machines allow unprivileged user namespaces; losing them must be loud, not a silent downgrade."""
    iso = isolation()
    assert iso.kind == "namespaces" and iso.network and iso.pid_namespace and iso.seccomp
