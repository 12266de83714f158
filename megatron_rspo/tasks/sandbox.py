"""Run untrusted Python (model-written code) in a resource-limited subprocess.

Containment, in order of strength (the kernel mechanisms are what we rely on):
  * a fresh temp directory as cwd/HOME/TMPDIR, deleted afterwards; ``python -I -B``; stripped env;
  * ``setrlimit`` in the child before exec: CPU seconds, address space, file size (this caps the
    stdout/stderr files too), open files, processes, no core dumps;
  * a wall-clock deadline, then SIGKILL to the whole process group (``start_new_session``);
  * stdout/stderr go to files in the temp dir and only their first ``max_output_bytes`` are read,
    so a flood of output never reaches the parent's memory;
  * a private network namespace (``unshare(CLONE_NEWNET)``: no interfaces up, not even loopback)
    where the kernel permits it;
  * as root, the child switches to ``nobody`` when that user can run the interpreter (it cannot when
    Python lives under /root, as on our dev box): then RLIMIT_NPROC applies (the kernel ignores it
    for root) and file permissions protect private files;
  * ``guard``: a Python audit hook (PEP 578) installed before the program runs. It denies process
    creation, signals to other processes, sockets/DNS, ctypes/cffi/resource imports, frame and gc
    introspection, opening files outside the temp dir (read-only access to the import path stays
    allowed) and modifying paths outside it. This is defence in depth, NOT a security boundary:
    a determined program can still, e.g., exhaust CPU within its limits or exploit an interpreter bug.
Honest limits: no seccomp, no mount/pid namespaces and no cgroups, so without the guard a root
program can read world-readable files, and a process that calls ``setsid`` escapes the group kill.
``preexec_fn`` is used, which Python documents as unsafe with threads (a deadlock risk in the child
before exec); it only makes C-level calls here.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import math
import os
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

NOBODY = 65534
_CLONE_NEWNET = 0x40000000
_PR_SET_NO_NEW_PRIVS = 38


@dataclass
class SandboxConfig:
    timeout_s: float = 5.0  # wall clock for the whole run
    cpu_s: int | None = None  # RLIMIT_CPU; None: ceil(timeout_s) + 1
    memory_mb: int = 512  # RLIMIT_AS (address space, so a bit above what the program can use)
    max_output_bytes: int = 64 * 1024  # stdout/stderr kept by the parent
    max_file_bytes: int = 1 << 20  # RLIMIT_FSIZE: any file written, the stdout/stderr files included
    max_channel_bytes: int = 8 << 20  # result-channel bytes read before the program is killed
    max_open_files: int = 64  # RLIMIT_NOFILE
    max_processes: int = 64  # RLIMIT_NPROC (the kernel ignores it for root: see drop_privileges)
    isolate_network: bool = True  # private network namespace when the kernel allows it
    drop_privileges: bool = True  # as root, run as ``nobody`` when it can run the interpreter
    guard: bool = True  # the Python audit-hook guard (defence in depth)
    tmp_root: str | None = None  # where temp dirs go (default: the system temp dir)


@dataclass
class SandboxResult:
    returncode: int | None  # negative: killed by that signal
    timed_out: bool  # killed at the wall-clock deadline
    stdout: str
    stderr: str
    stdout_truncated: bool
    stderr_truncated: bool
    channel: bytes  # what the program wrote to its result channel (``SANDBOX_CHANNEL_FD``)
    wall_s: float
    uid: int  # the user it ran as
    network_isolated: bool


class SandboxError(RuntimeError):
    """The sandbox itself could not start a program (not a failure of the program)."""


# The guard. Runs first in the child; hooks cannot be removed once added. The handful of names it
# binds in __main__ are harmless to expose.
_GUARD_SRC = r'''
def _rspo_install_guard(root):
    import os, sys, _posixsubprocess
    def _no_process(*args, **kwargs):
        raise PermissionError(13, "creating processes is blocked in the sandbox")
    _posixsubprocess.fork_exec = _no_process  # subprocess' C fork+exec raises no audit event itself
    realpath, fsdecode, isdir, sep = os.path.realpath, os.fsdecode, os.path.isdir, os.sep
    root = realpath(root)
    libs = tuple(realpath(p) for p in sys.path if p and isdir(p) and realpath(p) != root)
    deny = frozenset(("os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
        "subprocess.Popen", "os.kill", "os.killpg", "signal.pthread_kill", "resource.setrlimit",
        "resource.prlimit", "sys.settrace", "sys.setprofile", "sys._current_frames", "gc.get_objects",
        "gc.get_referrers", "gc.get_referents", "sys.remote_exec"))
    modify = frozenset(("os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.link",
        "os.symlink", "os.truncate", "os.utime", "shutil.rmtree", "os.chdir", "os.setxattr", "os.removexattr",
        "os.chflags", "os.lchflags", "os.lchmod", "os.mkfifo", "os.mknod"))
    blocked_imports = frozenset(("ctypes", "_ctypes", "cffi", "_cffi_backend", "resource", "_posixsubprocess",
        "_testcapi", "_testinternalcapi", "_xxsubinterpreters", "_xxinterpchannels", "_interpreters"))
    frame_attrs = frozenset(("tb_frame", "gi_frame", "cr_frame", "ag_frame"))

    def where(path):
        if isinstance(path, int) or path is None:
            return "fd"
        try:
            p = realpath(fsdecode(path))
        except (TypeError, ValueError):
            return "outside"
        if p == root or p.startswith(root + sep):
            return "inside"
        if any(p == lib or p.startswith(lib + sep) for lib in libs):
            return "dir" if isdir(p) else "lib"
        return "outside"

    def hook(event, args):
        if event == "open":
            place = where(args[0])
            if place in ("fd", "inside"):
                return
            mode, flags = args[1], args[2]
            read_only = (flags & 3) == os.O_RDONLY if mode is None else not any(c in str(mode) for c in "wax+")
            if place == "lib" and read_only:
                return  # imports read the standard library and site-packages
            raise PermissionError(13, "opening files outside the sandbox directory is blocked", str(args[0]))
        if event in deny or event.startswith("socket."):
            raise PermissionError(13, f"{event} is blocked in the sandbox")
        if event in modify:  # (dir_fd arguments need no check: only fds of dirs inside root can be opened)
            if all(where(a) == "inside" for a in args if isinstance(a, (str, bytes, os.PathLike))):
                return
            raise PermissionError(13, f"{event} outside the sandbox directory is blocked")
        if event in ("os.listdir", "os.scandir"):
            if where(args[0]) in ("fd", "inside", "dir", "lib"):
                return
            raise PermissionError(13, "listing directories outside the sandbox is blocked")
        if event == "import" and args[0].partition(".")[0] in blocked_imports:
            raise ImportError(f"import of {args[0]} is blocked in the sandbox")
        if event == "sys._getframe":
            raise ValueError("call stack is not deep enough")  # what callers already handle
        if event == "object.__getattr__" and args[1] in frame_attrs:
            raise AttributeError(args[1])

    sys.addaudithook(hook)
'''


def _env(work: str) -> dict[str, str]:
    one = "1"  # single-threaded BLAS: fewer processes and a smaller address space
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8", "OPENBLAS_NUM_THREADS": one, "OMP_NUM_THREADS": one, "MKL_NUM_THREADS": one}


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name, use_errno=True) if name else None


def _make_preexec(cfg: SandboxConfig, uid: int | None, netns: bool) -> Callable[[], None]:
    """The child's setup between fork and exec: limits, network namespace, privileges (in this order:
    unshare needs root, and limits set before dropping root cannot be raised again)."""
    cpu = cfg.cpu_s if cfg.cpu_s is not None else math.ceil(cfg.timeout_s) + 1
    limits = [(resource.RLIMIT_CPU, (cpu, cpu + 1)), (resource.RLIMIT_AS, (cfg.memory_mb << 20,) * 2),
              (resource.RLIMIT_FSIZE, (cfg.max_file_bytes,) * 2), (resource.RLIMIT_NOFILE, (cfg.max_open_files,) * 2),
              (resource.RLIMIT_NPROC, (cfg.max_processes,) * 2), (resource.RLIMIT_CORE, (0, 0))]
    libc = _libc()

    def preexec() -> None:
        for res, value in limits:
            resource.setrlimit(res, value)
        if netns and (libc is None or libc.unshare(_CLONE_NEWNET) != 0):
            raise OSError("unshare(CLONE_NEWNET) failed")
        if libc is not None:
            libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)  # no setuid-binary escalation after exec
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)

    return preexec


@functools.lru_cache(maxsize=4)
def _probe(netns: bool, uid: int | None) -> bool:
    """Whether a child can be started with this setup here (checked once per process)."""
    try:
        preexec = _make_preexec(SandboxConfig(), uid, netns)
        r = subprocess.run([sys.executable, "-I", "-B", "-c", "import json"], preexec_fn=preexec, cwd="/",
                           env=_env("/"), stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
        return r.returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _read_head(path: str, cap: int) -> tuple[str, bool]:
    with open(path, "rb") as f:
        data = f.read(cap + 1)
    return data[:cap].decode("utf-8", errors="replace"), len(data) > cap


def run_python(source: str, *, stdin: bytes = b"", config: SandboxConfig | None = None) -> SandboxResult:
    """Run ``source`` as a Python script inside the sandbox. The script may write results to the
    pipe ``SANDBOX_CHANNEL_FD`` (a global set before it runs); those bytes come back in ``channel``."""
    cfg = config or SandboxConfig()
    want_uid = NOBODY if cfg.drop_privileges and os.geteuid() == 0 else None
    uid = want_uid if want_uid is not None and _probe(False, want_uid) else None
    netns = cfg.isolate_network and _probe(True, None)
    top = tempfile.mkdtemp(prefix="rspo-sandbox-", dir=cfg.tmp_root)
    read_fd, write_fd = os.pipe()
    proc = None
    try:
        work = os.path.join(top, "work")
        os.mkdir(work, 0o700)
        if uid is not None:
            os.chmod(top, 0o711)  # nobody may traverse to work/ and read main.py, nothing else
            os.chown(work, uid, uid)
        script = os.path.join(top, "main.py")
        prelude = f"SANDBOX_CHANNEL_FD = {write_fd}\n"
        if cfg.guard:
            prelude += _GUARD_SRC + f"_rspo_install_guard({work!r})\ndel _rspo_install_guard\n"
        with open(script, "w", encoding="utf-8") as f:
            f.write(prelude + source)
        os.chmod(script, 0o644)
        with open(os.path.join(top, "stdin"), "wb") as f:
            f.write(stdin)
        start = time.monotonic()
        with open(os.path.join(top, "stdin"), "rb") as fin, open(os.path.join(top, "stdout"), "wb") as fout, \
                open(os.path.join(top, "stderr"), "wb") as ferr:
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-I", "-B", script], cwd=work, env=_env(work), stdin=fin, stdout=fout,
                    stderr=ferr, pass_fds=(write_fd,), start_new_session=True,
                    preexec_fn=_make_preexec(cfg, uid, netns),
                )
            except (OSError, subprocess.SubprocessError) as e:
                raise SandboxError(f"could not start the sandboxed program: {e}") from e
        os.unlink(os.path.join(top, "stdin"))  # the child holds it open; nothing can reopen it by name
        os.close(write_fd)
        write_fd = -1
        channel, timed_out = _wait(proc, read_fd, start + cfg.timeout_s, cfg.max_channel_bytes)
        wall = time.monotonic() - start
        stdout, out_cut = _read_head(os.path.join(top, "stdout"), cfg.max_output_bytes)
        stderr, err_cut = _read_head(os.path.join(top, "stderr"), cfg.max_output_bytes)
        return SandboxResult(proc.returncode, timed_out, stdout, stderr, out_cut, err_cut, channel, wall,
                             os.geteuid() if uid is None else uid, netns)
    finally:
        if proc is not None and proc.returncode is None:  # an exception on our side: leave nothing behind
            _kill_group(proc)
        for fd in (read_fd, write_fd):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(top, ignore_errors=True)


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _wait(proc: subprocess.Popen, fd: int, deadline: float, cap: int) -> tuple[bytes, bool]:
    """Collect channel bytes until the program exits or the deadline passes; then SIGKILL its whole
    process group (the leader is not reaped before that, so the group id cannot have been reused)."""
    chunks, size, open_, timed_out = [], 0, True, False
    while True:
        if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            break  # exited (still a zombie: its pid and group id stay reserved)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            timed_out = True
            break
        if not open_:
            time.sleep(min(remaining, 0.005))
            continue
        if select.select([fd], [], [], min(remaining, 0.005))[0]:
            data = os.read(fd, 1 << 16)
            if not data:
                open_ = False
            elif size + len(data) > cap:
                break  # flooding the channel: stop here (it is killed below)
            else:
                chunks.append(data)
                size += len(data)
    _kill_group(proc)
    os.set_blocking(fd, False)  # whatever is left in the pipe; a writer that escaped the group can't block us
    with contextlib.suppress(BlockingIOError, OSError):
        while size <= cap and (data := os.read(fd, 1 << 16)):
            chunks.append(data)
            size += len(data)
    return b"".join(chunks)[:cap], timed_out
