"""The sandbox's launcher: a fresh single-threaded interpreter that builds the jail, then becomes the program.

Run as ``python -I -S sandbox_launcher.py CONFIG.json`` by :mod:`diptych.core.sandbox`, never imported
(standard library only, so it runs under the base interpreter without the venv). Doing this work here
rather than in a ``preexec_fn`` keeps Python out of a forked multithreaded parent (see sandbox.py).

Three processes, because the kernel needs them:

- L (this process, outside): forks C and, from outside the new user namespace, writes C's uid/gid map
  (as root it maps the sandbox's root to an unprivileged uid of its own, which only the outside can do);
- C (new user, mount, network, IPC, UTS and PID namespaces): waits for the map, forks G, relays its status;
- G (pid 1 of the new PID namespace): mounts a fresh tmpfs as the root with read-only binds of only
  what the interpreter needs, pivots into it, applies rlimits, drops every capability, installs the
  seccomp filter and execs the program. When G exits the kernel kills everything left in its namespace.

Exit status: 125 and a ``sandbox:`` line on stderr when the jail could not be built; otherwise the program's.
"""

import contextlib
import ctypes
import json
import os
import platform
import resource
import signal
import struct
import sys

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET, CLONE_NEWCGROUP = 0x10000000, 0x20000000, 0x40000000, 0x02000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE, MS_RELATIME = 1024, 2048, 4096, 16384, 1 << 18, 1 << 21
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_SECCOMP, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT = 1, 22, 24, 38, 47
SECCOMP_MODE_FILTER = 2
# statvfs flag -> the mount flag a read-only remount must repeat (the kernel locks them in a user namespace)
_LOCKED = {2: MS_NOSUID, 4: MS_NODEV, 8: MS_NOEXEC, 1024: MS_NOATIME, 2048: MS_NODIRATIME, 4096: MS_RELATIME}

# Syscall numbers by machine; the filter and pivot_root need them. Elsewhere the sandbox refuses strict mode.
ARCH = {"x86_64": {"audit": 0xC000003E, "pivot_root": 155, "socket": 41, "clone": 56, "clone3": 435, "x32": True,
                   "deny": [101, 165, 166, 155, 161, 272, 308, 248, 249, 250, 321, 298, 323, 303, 304, 310, 311,
                            246, 320, 175, 313, 176, 425, 428, 429, 430, 431, 432, 433, 442, 163, 167, 168, 169, 172,
                            173, 103, 179, 153]}}
# ptrace mount umount2 pivot_root chroot unshare setns add_key request_key keyctl bpf perf_event_open userfaultfd
# name_to_handle_at open_by_handle_at process_vm_readv/writev kexec_load kexec_file_load init_module
# finit_module delete_module io_uring_setup open_tree move_mount fsopen fsconfig fsmount fspick mount_setattr acct
# swapon swapoff reboot iopl ioperm syslog quotactl vhangup

libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


def die(msg: str) -> None:
    os.write(2, f"sandbox: {msg}\n".encode())
    os._exit(125)


def check(ret: int, what: str) -> None:
    if ret != 0:
        die(f"{what} failed: {os.strerror(ctypes.get_errno())}")


def mount(src, target, fstype, flags, data=None) -> None:
    enc = (lambda s: None if s is None else os.fsencode(s))
    check(libc.mount(enc(src), enc(target), enc(fstype), flags, enc(data)), f"mount {src} on {target}")


def relay(pid: int) -> None:
    """Wait for ``pid`` and end the same way, so the caller sees the program's code or signal."""
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        with contextlib.suppress(OSError, ValueError):
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)
    os._exit(os.waitstatus_to_exitcode(status))


def seccomp_program(arch: dict) -> bytes:
    """A classic BPF filter: deny syscalls that reach the kernel's attack surface or undo the jail."""
    allow, enosys = 0x7FFF0000, 0x00050000 | 38
    eperm, eafnosupport = 0x00050000 | 1, 0x00050000 | 97
    new_ns = CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWCGROUP
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    code = [(ld, 4), (jeq, arch["audit"], None, "deny"), (ld, 0)]  # another ABI (i386 int 0x80) is denied whole
    if arch["x32"]:
        code.append((jge, 0x40000000, "deny", None))
    code += [(jeq, nr, "deny", None) for nr in arch["deny"]]
    code += [(jeq, arch["clone3"], "enosys", None),  # its flags sit in memory a filter cannot read; libc falls back
             (jeq, arch["socket"], "socket", None), (jeq, arch["clone"], "clone", None), (ret, allow),
             "socket", (ld, 16), (jeq, 1, "allow", "eafnosupport"),  # AF_UNIX only
             "clone", (ld, 16), (jset, new_ns, "deny", "allow"),
             "deny", (ret, eperm), "enosys", (ret, enosys), "eafnosupport", (ret, eafnosupport), "allow", (ret, allow)]
    labels, n = {}, 0
    for ins in code:
        if isinstance(ins, str):
            labels[ins] = n
        else:
            n += 1
    out, i = b"", 0
    for ins in code:
        if isinstance(ins, str):
            continue
        op, k, *jumps = ins
        jt, jf = (0 if j is None else labels[j] - i - 1 for j in (jumps or [None, None]))
        out += struct.pack("HBBI", op, jt, jf, k)
        i += 1
    return out


def lock_down(rlimits: list, use_seccomp: bool) -> None:
    """Rlimits, no capabilities after exec (empty bounding set), no new privileges, the seccomp filter."""
    for name, soft, hard in rlimits:
        resource.setrlimit(getattr(resource, name), (soft, hard))
    for cap in range(64):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            break
    libc.prctl(PR_CAP_AMBIENT, 4, 0, 0, 0)  # PR_CAP_AMBIENT_CLEAR_ALL
    check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    if use_seccomp:
        arch = ARCH[platform.machine()]
        prog = seccomp_program(arch)
        buf = ctypes.create_string_buffer(prog, len(prog))
        fprog = struct.pack("HxxxxxxP", len(prog) // 8, ctypes.addressof(buf))
        fbuf = ctypes.create_string_buffer(fprog, len(fprog))
        check(libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fbuf), 0, 0), "seccomp")


def build_root(cfg: dict, fds: dict, locked: dict) -> None:
    """Mount the new root (a tmpfs), fill it, pivot into it and detach the old one."""
    root = cfg["root"]
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, f"size={cfg['tmpfs_mb']}m,mode=0755")
    for path, kind in cfg["binds"]:
        dst = root + path
        if kind == "dir":
            os.makedirs(dst, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            open(dst, "a").close()
        # through our O_PATH fd: the path itself may sit under a directory we may not traverse (e.g. /root)
        mount(f"/proc/self/fd/{fds[path]}", dst, None, MS_BIND | MS_REC)
        if kind != "dev":
            mount(None, dst, None, MS_BIND | MS_REMOUNT | MS_RDONLY | locked[path])
    for path, target in cfg["symlinks"]:
        os.symlink(target, root + path)
    for path in cfg["masks"]:
        mount("tmpfs", root + path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV, "size=4k,mode=0555")
    # the only writable places, each a size-capped tmpfs of its own; the root itself is made read-only below
    work = root + cfg["workdir"]
    for path, mode in ((root + "/tmp", "1777"), (work, "0755")):
        os.makedirs(path, exist_ok=True)
        mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, f"size={cfg['tmpfs_mb']}m,mode={mode}")
    for name, text in cfg["files"].items():
        target = os.path.join(work, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "w", encoding="utf-8") as f:
            f.write(text)
    os.chdir(root)
    check(libc.syscall(ARCH[platform.machine()]["pivot_root"], b".", b"."), "pivot_root")
    check(libc.umount2(b".", MNT_DETACH), "detaching the old root")
    mount(None, "/", None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.chdir(cfg["workdir"])


def jailed(cfg: dict, fds: dict, locked: dict) -> None:
    """G: pid 1 of the new namespaces."""
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    build_root(cfg, fds, locked)
    lock_down(cfg["rlimits"], cfg["seccomp"])
    os.closerange(3, 1 << 16)
    argv = cfg["argv"]
    try:
        os.execvpe(argv[0], argv, cfg["env"])
    except OSError as e:
        os.write(2, f"sandbox: cannot start {argv[0]!r}: {e}\n".encode())
        os._exit(127)


def main() -> None:
    with open(sys.argv[1], encoding="utf-8") as f:
        cfg = json.load(f)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if platform.machine() not in ARCH:
        die(f"no syscall table for {platform.machine()}")
    locked = {}
    for path, _ in cfg["binds"]:
        try:
            flag = os.statvfs(path).f_flag
        except OSError as e:
            die(f"cannot find {path} for the read-only view: {e}")
        locked[path] = sum(ms for st, ms in _LOCKED.items() if flag & st)
    if os.geteuid() == 0:
        os.setgroups([])  # else the program would keep root's supplementary groups
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(ready_r)
        os.close(go_w)
        flags = CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWPID
        if libc.unshare(flags) != 0:
            die(f"unshare(user, mount, net, ipc, uts, pid) failed: {os.strerror(ctypes.get_errno())}")
        os.write(ready_w, b"u")
        os.close(ready_w)
        if os.read(go_r, 1) != b"m":
            os._exit(125)
        os.close(go_r)
        # Opened in the new mount namespace (a bind source must live there) and still as our outside uid,
        # which may traverse directories (/root) that the sandbox uid may not.
        fds = {}
        for path, _ in cfg["binds"]:
            try:
                fds[path] = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError as e:
                die(f"cannot open {path} for the read-only view: {e}")
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)
        g = os.fork()
        if g == 0:
            jailed(cfg, fds, locked)
        for fd in fds.values():
            os.close(fd)
        relay(g)
    os.close(ready_w)
    os.close(go_r)
    if os.read(ready_r, 1) == b"u":
        try:
            if os.geteuid() != 0:
                with open(f"/proc/{pid}/setgroups", "w") as f:
                    f.write("deny")
            with open(f"/proc/{pid}/uid_map", "w") as f:
                f.write(f"0 {cfg['uid']} 1\n")
            with open(f"/proc/{pid}/gid_map", "w") as f:
                f.write(f"0 {cfg['gid']} 1\n")
            os.write(go_w, b"m")
        except OSError as e:
            os.write(2, f"sandbox: cannot map the sandbox's user: {e}\n".encode())
    os.close(go_w)
    relay(pid)


if __name__ == "__main__":
    main()
