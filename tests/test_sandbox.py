"""Sandboxed execution of generated programs: limits, blocked operations and statuses."""

from __future__ import annotations

import os
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from evals.sandbox import SandboxResult, run_program
from guard.errors import ConfigError


def _live_processes_with_home(workdir: str) -> list[int]:
    """Return pids of running processes whose environment has HOME set to ``workdir``."""
    marker = f"HOME={workdir}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in environ.split(b"\0") and state != "Z":
            found.append(int(entry.name))
    return found


def _process_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_sandbox_correct_program_passes():
    result = run_program("assert sum(range(5)) == 10\nprint('ok')\n")
    assert isinstance(result, SandboxResult)
    assert result.status == "passed"
    assert result.returncode == 0
    assert result.stdout_tail == "ok\n"


def test_sandbox_assertion_fails():
    result = run_program("assert 1 == 2, 'wrong'\n")
    assert result.status == "failed"
    assert "AssertionError: wrong" in result.stderr_tail


def test_sandbox_syntax_error_fails():
    result = run_program("def broken(:\n")
    assert result.status == "failed"
    assert "SyntaxError" in result.stderr_tail


def test_sandbox_infinite_loop_times_out():
    started = time.monotonic()
    result = run_program("while True:\n    pass\n", timeout_s=1.0)
    assert result.status == "timeout"
    assert result.returncode is None
    # Generous bound on a busy machine: the kill happens at 1 s, not at some later limit.
    assert time.monotonic() - started < 30


def test_sandbox_sleep_times_out():
    result = run_program("import time\ntime.sleep(60)\n", timeout_s=0.5)
    assert result.status == "timeout"


def test_sandbox_fork_bomb_blocked():
    code = textwrap.dedent(
        """
        import os, sys
        print(os.getcwd(), flush=True)
        while True:
            os.fork()
        """
    )
    result = run_program(code, timeout_s=5.0)
    assert result.status == "failed"
    assert "PermissionError: sandbox: os.fork is disabled" in result.stderr_tail
    workdir = result.stdout_tail.strip()
    assert workdir
    assert _live_processes_with_home(workdir) == []
    assert not os.path.exists(workdir)


def test_sandbox_raw_fork_audit_blocked():
    # posix.fork is the C function itself, not the replaced os.fork, so only the audit hook stops it.
    result = run_program("import posix\nposix.fork()\n")
    assert result.status == "failed"
    assert "creating processes is blocked (os.fork)" in result.stderr_tail


def test_sandbox_subprocess_blocked():
    result = run_program("import subprocess\nsubprocess.run(['true'])\n")
    assert result.status == "failed"
    assert "subprocess.Popen is disabled" in result.stderr_tail


def test_sandbox_allows_processes_when_asked():
    result = run_program("import subprocess\nsubprocess.run(['true'], check=True)\n", max_processes=4)
    assert result.status == "passed"


def test_sandbox_timeout_kills_children():
    code = textwrap.dedent(
        """
        import subprocess, time
        child = subprocess.Popen(['sleep', '120'])
        print(child.pid, flush=True)
        time.sleep(120)
        """
    )
    result = run_program(code, timeout_s=2.0, max_processes=4)
    assert result.status == "timeout"
    child_pid = int(result.stdout_tail.split()[0])
    deadline = time.monotonic() + 10
    while _process_alive(child_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _process_alive(child_pid)


def test_sandbox_write_outside_blocked():
    target = Path("/tmp") / f"softguard-escape-{uuid.uuid4().hex}"
    result = run_program(f"open({str(target)!r}, 'w').write('escaped')\n")
    assert result.status == "failed"
    assert "writing outside the working directory is blocked" in result.stderr_tail
    assert not target.exists()


def test_sandbox_relative_escape_blocked():
    name = f"softguard-escape-{uuid.uuid4().hex}"
    result = run_program(f"open('../{name}', 'w').write('escaped')\n")
    assert result.status == "failed"
    assert not (Path("/tmp") / name).exists()


def test_sandbox_delete_outside_blocked(tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("data")
    result = run_program(f"import os\nos.remove({str(victim)!r})\n")
    assert result.status == "failed"
    assert "os.remove outside the working directory is blocked" in result.stderr_tail
    assert victim.read_text() == "data"


def test_sandbox_dir_fd_escape_blocked():
    name = f"softguard-escape-{uuid.uuid4().hex}"
    code = (
        "import os\n"
        "fd = os.open('/tmp', os.O_RDONLY)\n"
        f"os.open({name!r}, os.O_WRONLY | os.O_CREAT, dir_fd=fd)\n"
    )
    result = run_program(code)
    assert result.status == "failed"
    assert not (Path("/tmp") / name).exists()


def test_sandbox_write_inside_allowed():
    code = "open('note.txt', 'w').write('kept')\nprint(open('note.txt').read())\n"
    result = run_program(code)
    assert result.status == "passed"
    assert result.stdout_tail == "kept\n"


def test_sandbox_huge_allocation_crashes():
    result = run_program("block = bytearray(64 * 1024 ** 3)\n", memory_mb=256)
    assert result.status == "crashed"
    assert "MemoryError" in result.stderr_tail


def test_sandbox_segfault_crashes():
    result = run_program("import faulthandler\nfaulthandler._sigsegv()\n")
    assert result.status == "crashed"
    assert result.returncode < 0


def test_sandbox_socket_blocked():
    result = run_program("import socket\nsocket.socket()\n")
    assert result.status == "failed"
    assert "socket.__new__ is blocked" in result.stderr_tail


def test_sandbox_ctypes_blocked():
    result = run_program("import ctypes\n")
    assert result.status == "failed"
    assert "ctypes.dlopen is blocked" in result.stderr_tail


def test_sandbox_environment_scrubbed(monkeypatch):
    monkeypatch.setenv("SOFTGUARD_SECRET_TOKEN", "do-not-leak")
    result = run_program("import os\nprint(sorted(os.environ))\n")
    assert result.status == "passed"
    assert "SOFTGUARD_SECRET_TOKEN" not in result.stdout_tail


def test_sandbox_output_tail_bounded():
    result = run_program("print('a' * 100000 + 'END')\n", max_output_bytes=16)
    assert result.status == "passed"
    assert len(result.stdout_tail) == 16
    assert result.stdout_tail.endswith("END\n")


def test_sandbox_nonzero_exit_fails():
    result = run_program("import sys\nsys.exit(3)\n")
    assert result.status == "failed"
    assert result.returncode == 3


def test_sandbox_rejects_non_string_code():
    with pytest.raises(ConfigError, match="code must be a str"):
        run_program(b"print(1)")


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("timeout_s", 0, "timeout_s=0 is out of range"),
        ("timeout_s", float("inf"), "timeout_s=inf is out of range"),
        ("memory_mb", 1.5, "memory_mb=1.5 is not an integer"),
        ("max_processes", -1, "max_processes=-1 is out of range"),
    ],
)
def test_sandbox_rejects_bad_limits(option, value, message):
    with pytest.raises(ConfigError, match=message):
        run_program("pass", **{option: value})
