"""Escapes from the sandbox that an in-Python guard cannot stop: each must fail because the OS refuses it.

Every program here worked against the audit-hook sandbox (issue 13): it wrote outside the working
directory, ran /bin/sh, or read files it had no business reading. The target directory is
world-writable on purpose, so only the sandbox (not file permissions) stands in the way.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from diptych.core.sandbox import run_python

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/ns/user"), reason="needs Linux namespaces")


@pytest.fixture
def outside() -> Iterator[Path]:
    """A world-writable directory outside the sandbox, checked for anything the program left there."""
    d = Path(tempfile.mkdtemp(prefix="diptych-outside-"))
    d.chmod(0o777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _assert_untouched(d: Path) -> None:
    assert list(d.iterdir()) == [], f"the sandboxed program wrote outside: {list(d.iterdir())}"


def test_rewriting_the_guard_module_state_does_not_allow_writes(outside):
    code = (
        "import sys\nm = sys.modules['__main__']\n"
        "m._inside = lambda p: True\n"
        f"open({str(outside / 'a.txt')!r}, 'w').write('escaped')\n"
    )
    run_python(code)
    _assert_untouched(outside)


def test_flipping_the_spawn_switch_does_not_run_a_shell(outside):
    code = (
        "import sys, subprocess\nsys.modules['__main__'].ALLOW_SPAWN = True\n"
        f"subprocess.run(['/bin/sh', '-c', 'echo pwned > {outside}/b.txt'])\n"
    )
    r = run_python(code)
    assert not r.ok
    _assert_untouched(outside)


def test_open_relative_to_a_directory_fd_cannot_write_outside(outside):
    rel = str(outside / "c.txt").lstrip("/")
    code = f"import os\nfd = os.open('/', os.O_RDONLY)\nos.open({rel!r}, os.O_CREAT | os.O_WRONLY, dir_fd=fd)"
    r = run_python(code)
    assert not r.ok
    _assert_untouched(outside)


def test_posixsubprocess_fork_exec_cannot_run_a_shell(outside):
    code = (
        "import _posixsubprocess, os\nr, w = os.pipe()\n"
        f"args = [b'/bin/sh', b'-c', b'echo pwned > {outside}/d.txt']\n"
        "pid = _posixsubprocess.fork_exec(args, (b'/bin/sh',), True, (w,), None, None, -1, -1, -1, -1, -1, -1, r, w,"
        " True, False, -1, None, None, None, -1, None, False)\n"
        "os.close(w)\nprint('child error', os.read(r, 200))\nos.waitpid(pid, 0)\n"
    )
    run_python(code)
    _assert_untouched(outside)


def test_mkfifo_outside_is_refused(outside):
    r = run_python(f"import os\nos.mkfifo({str(outside / 'e.fifo')!r})\n")
    assert not r.ok
    _assert_untouched(outside)


def test_files_outside_the_view_are_unreadable():
    secret_dir = Path(tempfile.mkdtemp(prefix="diptych-secret-"))
    try:
        secret_dir.chmod(0o755)
        secret = secret_dir / "secret.txt"
        secret.write_text("diptych-secret-7a3f9")
        secret.chmod(0o644)
        this_file = Path(__file__).resolve()  # in the repo, world-readable
        code = (
            f"for p in ({str(secret)!r}, {str(this_file)!r}, '/etc/passwd', '/etc/hostname'):\n"
            "    try:\n        print(open(p).read())\n    except OSError as e:\n        print('unreadable', p)\n"
            "import os\nfor d in ('/etc', '/home', '/root', '/work', "
            f"{str(this_file.parents[2])!r}):\n"
            "    try:\n        print(d, os.listdir(d))\n    except OSError:\n        print('absent', d)\n"
        )
        r = run_python(code)
        assert r.ok, r.stderr
        assert "diptych-secret-7a3f9" not in r.stdout
        assert "world-readable" not in r.stdout  # a phrase of this file's docstring
        assert "root:" not in r.stdout
        assert r.stdout.count("unreadable") == 4
        for d in ("/etc", "/home", "/work", str(this_file.parents[2])):
            assert f"absent {d}" in r.stdout or f"{d} []" in r.stdout, r.stdout
    finally:
        shutil.rmtree(secret_dir, ignore_errors=True)


def test_the_host_site_packages_are_not_importable():
    r = run_python("import sys\nsys.path += ['/work/main/.venv/lib/python3.11/site-packages']\nimport numpy\n")
    assert not r.ok and "ModuleNotFoundError" in r.stderr


def test_a_local_listener_cannot_be_reached():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(3.0)
    port = server.getsockname()[1]
    seen: list[object] = []

    def accept() -> None:
        with contextlib.suppress(OSError):
            seen.append(server.accept())

    t = threading.Thread(target=accept)
    t.start()
    code = (
        "import socket\ntry:\n"
        f"    socket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'leak')\n    print('connected')\n"
        "except OSError as e:\n    print('blocked', e)\n"
    )
    try:
        r = run_python(code)
    finally:
        t.join()
        server.close()
    assert "connected" not in r.stdout
    assert seen == []


def test_the_program_has_no_capabilities_and_cannot_create_namespaces():
    code = (
        "print([l for l in open('/proc/self/status').read().splitlines() if l.startswith('Cap')]"
        " if __import__('os').path.exists('/proc/self/status') else 'no proc')\n"
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "print('unshare', libc.unshare(0x10000000), 'mount', libc.mount(b'none', b'/tmp', b'tmpfs', 0, None))\n"
        "pid = libc.syscall(56, 0x10000000 | 17, 0, 0, 0, 0)\n"  # clone(CLONE_NEWUSER | SIGCHLD)
        "if pid == 0:\n    __import__('os')._exit(0)\nprint('clone', pid)\n"
    )
    r = run_python(code)
    assert r.ok, r.stderr
    assert "unshare -1 mount -1" in r.stdout and "clone -1" in r.stdout


def test_the_seccomp_filter_refuses_internet_sockets_and_ptrace_but_not_unix_sockets():
    code = (
        "import ctypes, errno, socket\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "try:\n    socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n    print('inet allowed')\n"
        "except OSError as e:\n    print('inet', errno.errorcode[e.errno])\n"
        "a, b = socket.socketpair()\na.sendall(b'unix ok')\nprint(b.recv(7).decode())\n"
        "print('ptrace', libc.ptrace(0, 0, 0, 0), errno.errorcode[ctypes.get_errno()])\n"
    )
    r = run_python(code)
    assert r.ok, r.stderr
    # in a fresh network namespace an AF_INET socket is allowed by the kernel; only the filter says EAFNOSUPPORT
    assert r.stdout.splitlines() == ["inet EAFNOSUPPORT", "unix ok", "ptrace -1 EPERM"]
