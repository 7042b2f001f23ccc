"""Run untrusted generated Python code in a limited subprocess.

Each program runs in a fresh interpreter (``python -I -B``) in its own temporary working
directory and its own process group, with a scrubbed environment and resource limits
(address space, data segment, CPU time, file size, open files, processes). Before the
program starts, a bootstrap script installs a Python audit hook (PEP 578) and replaces the
dangerous ``os``/``shutil``/``subprocess`` functions with stubs. Together they block:

- creating processes (fork, exec, spawn, ``subprocess``, ``os.system``) unless allowed,
- writing, deleting, renaming or changing files outside the working directory,
- sending signals to other processes, sockets of any kind, ``ctypes`` and raising the limits.

A program that exceeds the wall-clock limit is killed with its whole process group, so a
hanging or crashing completion yields a result instead of a hung caller.

NOTE: this guards against accidents of generated code, not against a determined attacker:
it is a Python-level guard plus rlimits, not a container. Processes that start their own
session escape the group kill, and RLIMIT_NPROC does not bind the root user.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

from guard.errors import ConfigError

logger = logging.getLogger(__name__)

STATUSES = ("passed", "failed", "timeout", "crashed")

# Exit codes that the bootstrap script uses for conditions that are not a plain failure.
EXIT_MEMORY = 86
EXIT_SETUP = 87

_BOOTSTRAP = r'''
import sys
EXIT_MEMORY, EXIT_SETUP = {exit_memory}, {exit_setup}
try:
    import builtins, faulthandler, os, resource, shutil, subprocess, traceback, linecache
    import _posixsubprocess
    memory_bytes, cpu_seconds, file_bytes, max_processes = (int(v) for v in sys.argv[2:6])
    workdir = os.path.realpath(os.getcwd())

    def set_limit(kind, value):
        resource.setrlimit(kind, (value, value))

    set_limit(resource.RLIMIT_AS, memory_bytes)
    set_limit(resource.RLIMIT_DATA, memory_bytes)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
    set_limit(resource.RLIMIT_FSIZE, file_bytes)
    set_limit(resource.RLIMIT_CORE, 0)
    set_limit(resource.RLIMIT_NOFILE, 256)
    if max_processes == 0:
        set_limit(resource.RLIMIT_NPROC, 0)
    else:
        # RLIMIT_NPROC counts every process of this user, so the cap is relative to now.
        current = 0
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    if os.stat("/proc/" + entry).st_uid == os.getuid():
                        current += 1
                except OSError:
                    pass
        set_limit(resource.RLIMIT_NPROC, current + max_processes)
    faulthandler.disable()
except Exception as error:
    sys.stderr.write("sandbox setup failed: %r\n" % (error,))
    sys.exit(EXIT_SETUP)

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
PROCESS_EVENTS = {{"os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn", "os.system",
                  "subprocess.Popen", "pty.spawn", "os.startfile"}}
# Event name -> (indices of path arguments, indices of dir_fd arguments) in its audit args.
PATH_EVENTS = {{"os.remove": ((0,), (1,)), "os.rmdir": ((0,), (1,)), "os.mkdir": ((0,), (2,)),
               "os.chmod": ((0,), (2,)), "os.chown": ((0,), (3,)), "os.utime": ((0,), (3,)),
               "os.chflags": ((0,), ()), "os.lchflags": ((0,), ()), "os.setxattr": ((0,), ()),
               "os.removexattr": ((0,), ()), "os.truncate": ((0,), ()),
               "os.mkfifo": ((0,), (2,)), "os.mknod": ((0,), (3,)), "shutil.rmtree": ((0,), (1,)),
               "os.rename": ((0, 1), (2, 3)), "os.symlink": ((1,), (2,)), "os.link": ((1,), (2, 3))}}
BLOCKED_EVENTS = {{"socket.__new__", "socket.connect", "socket.bind", "socket.sendto",
                  "socket.sendmsg", "socket.getaddrinfo", "socket.gethostbyname",
                  "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "ctypes.call_function",
                  "resource.setrlimit", "resource.prlimit", "webbrowser.open"}}


def inside_workdir(path):
    if isinstance(path, int):
        return True
    try:
        resolved = os.path.realpath(os.fsdecode(path))
    except (TypeError, ValueError):
        return False
    return resolved == workdir or resolved.startswith(workdir + os.sep) or resolved == "/dev/null"


def audit(event, args):
    if event == "open":
        path, flags = args[0], args[2]
        if isinstance(flags, int) and flags & WRITE_FLAGS and not inside_workdir(path):
            raise PermissionError("sandbox: writing outside the working directory is blocked: %r" % (path,))
    elif event in PATH_EVENTS:
        path_indices, dir_fd_indices = PATH_EVENTS[event]
        for index in dir_fd_indices:
            if index < len(args) and args[index] not in (None, -1):
                raise PermissionError("sandbox: %s with dir_fd is blocked" % event)
        for index in path_indices:
            if not inside_workdir(args[index]):
                raise PermissionError("sandbox: %s outside the working directory is blocked: %r"
                                      % (event, args[index]))
    elif event in PROCESS_EVENTS:
        if max_processes == 0:
            raise PermissionError("sandbox: creating processes is blocked (%s)" % event)
    elif event in ("os.kill", "os.killpg"):
        if event == "os.killpg" or args[0] != os.getpid():
            raise PermissionError("sandbox: signalling other processes is blocked (%s)" % event)
    elif event in BLOCKED_EVENTS:
        raise PermissionError("sandbox: %s is blocked" % event)


def blocked(name):
    def stub(*args, **kwargs):
        raise PermissionError("sandbox: %s is disabled" % name)
    stub.__name__ = name.rsplit(".", 1)[-1]
    return stub


# Stubs catch direct calls even where an extension skips the audit event, such as
# _posixsubprocess.fork_exec, which subprocess calls after its own audit event.
DISABLED = [(os, "kill"), (os, "killpg"), (shutil, "rmtree"), (shutil, "chown"),
            (os, "chroot"), (os, "setuid"), (os, "setgid"), (os, "fchdir")]
if max_processes == 0:
    DISABLED += [(os, "fork"), (os, "forkpty"), (os, "system"), (os, "execv"), (os, "execve"),
                 (os, "posix_spawn"), (os, "posix_spawnp"), (os, "spawnv"), (os, "spawnve"),
                 (subprocess, "Popen"), (_posixsubprocess, "fork_exec")]
for module, name in DISABLED:
    if hasattr(module, name):
        setattr(module, name, blocked(module.__name__ + "." + name))
builtins.help = blocked("help")

# The "open" audit event does not carry dir_fd, so a path relative to a descriptor of another
# directory would pass the check; reject dir_fd in os.open instead.
unguarded_open = os.open


def guarded_open(path, flags, mode=0o777, *, dir_fd=None):
    if dir_fd is not None:
        raise PermissionError("sandbox: os.open with dir_fd is blocked")
    return unguarded_open(path, flags, mode)


os.open = guarded_open
sys.modules["posix"].open = guarded_open
sys.addaudithook(audit)

try:
    with open(sys.argv[1], encoding="utf-8") as handle:
        source = handle.read()
    code = compile(source, "program.py", "exec")
    namespace = {{"__name__": "__main__", "__builtins__": builtins}}
    exec(code, namespace)
except MemoryError:
    sys.stderr.write("MemoryError: the program exceeded the memory limit\n")
    sys.stderr.flush()
    os._exit(EXIT_MEMORY)
except SystemExit:
    raise
except BaseException:
    traceback.print_exc()
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(1)
sys.stdout.flush()
'''


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one sandboxed program.

    ``status`` is ``passed`` (exit code 0), ``failed`` (the program raised or exited non-zero,
    including blocked operations), ``timeout`` (wall-clock or CPU limit) or ``crashed``
    (killed by a signal, out of memory, or the sandbox could not be set up). ``returncode``
    is the child's exit code, negative for a signal, or None when killed on timeout.
    """

    status: str
    returncode: int | None
    stdout_tail: str
    stderr_tail: str
    duration_s: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


class _TailReader(threading.Thread):
    """Drain a pipe, keeping only its last ``limit`` bytes so a chatty program cannot fill memory."""

    def __init__(self, stream, limit: int):
        super().__init__(daemon=True)
        self.stream = stream
        self.limit = limit
        self.buffer = bytearray()
        self.total = 0

    def run(self) -> None:
        try:
            while True:
                chunk = self.stream.read(65536)
                if not chunk:
                    break
                self.total += len(chunk)
                self.buffer += chunk
                if len(self.buffer) > self.limit:
                    del self.buffer[: len(self.buffer) - self.limit]
        except (OSError, ValueError):
            pass

    def text(self) -> str:
        return bytes(self.buffer).decode("utf-8", errors="replace")


def _check_number(field: str, value: object, minimum: float, *, integer: bool) -> None:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{field}={value!r} is not {kind}. Pass a value >= {minimum}.")
    if not math.isfinite(value) or value < minimum:
        raise ConfigError(f"{field}={value!r} is out of range. Pass a finite value >= {minimum}.")


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _classify(returncode: int | None, timed_out: bool) -> str:
    if timed_out or returncode == -signal.SIGXCPU:
        return "timeout"
    if returncode == 0:
        return "passed"
    if returncode is None or returncode < 0 or returncode in (EXIT_MEMORY, EXIT_SETUP):
        return "crashed"
    return "failed"


def run_program(
    code: str,
    *,
    timeout_s: float = 10.0,
    memory_mb: int = 1024,
    max_processes: int = 0,
    max_output_bytes: int = 65536,
    max_file_mb: int = 16,
) -> SandboxResult:
    """Run ``code`` as a Python program in a sandboxed subprocess and return its result.

    Limits:

    - ``timeout_s``: wall-clock seconds; the CPU-time limit is that, rounded up, plus one.
    - ``memory_mb``: address space (RLIMIT_AS and RLIMIT_DATA) in MiB.
    - ``max_processes``: 0 blocks fork, exec and spawn. A positive value allows them and caps
      RLIMIT_NPROC at the user's current process count plus this value, which the kernel
      does not enforce for root.
    - ``max_output_bytes``: how much of the end of stdout and of stderr is kept.
    - ``max_file_mb``: size limit (RLIMIT_FSIZE) of any file the program writes.

    The temporary working directory is removed afterwards.
    """
    if not isinstance(code, str):
        raise ConfigError(f"code must be a str of Python source; got {type(code).__name__}.")
    _check_number("timeout_s", timeout_s, 0.01, integer=False)
    _check_number("memory_mb", memory_mb, 32, integer=True)
    _check_number("max_processes", max_processes, 0, integer=True)
    _check_number("max_output_bytes", max_output_bytes, 0, integer=True)
    _check_number("max_file_mb", max_file_mb, 1, integer=True)

    workdir = tempfile.mkdtemp(prefix="softguard-sandbox-")
    start = time.monotonic()
    process = None
    timed_out = False
    try:
        program_path = os.path.join(workdir, "program.py")
        bootstrap_path = os.path.join(workdir, "_bootstrap.py")
        with open(program_path, "w", encoding="utf-8") as handle:
            handle.write(code)
        with open(bootstrap_path, "w", encoding="utf-8") as handle:
            handle.write(_BOOTSTRAP.format(exit_memory=EXIT_MEMORY, exit_setup=EXIT_SETUP))
        env = {
            "PATH": os.defpath,
            "HOME": workdir,
            "TMPDIR": workdir,
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        }
        command = [
            sys.executable, "-I", "-B", bootstrap_path, program_path,
            str(memory_mb * 1024 * 1024), str(math.ceil(timeout_s) + 1),
            str(max_file_mb * 1024 * 1024), str(max_processes),
        ]
        process = subprocess.Popen(
            command, cwd=workdir, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
        )
        readers = [
            _TailReader(process.stdout, max_output_bytes),
            _TailReader(process.stderr, max_output_bytes),
        ]
        for reader in readers:
            reader.start()
        try:
            returncode = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            returncode = None
            _kill_group(process.pid)
            process.wait()
        # Take down any process the program left behind in its group.
        _kill_group(process.pid)
        for reader in readers:
            reader.join(timeout=5.0)
        duration = time.monotonic() - start
        status = _classify(returncode, timed_out)
        logger.debug("sandboxed program %s in %.2fs (exit code %s)", status, duration, returncode)
        return SandboxResult(status, returncode, readers[0].text(), readers[1].text(), duration)
    finally:
        if process is not None and process.poll() is None:
            _kill_group(process.pid)
            process.wait()
        if process is not None:
            for stream in (process.stdout, process.stderr):
                if stream is not None:
                    stream.close()
        shutil.rmtree(workdir, ignore_errors=True)
