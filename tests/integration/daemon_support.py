"""Helpers for the daemon integration tests: spawn a daemon process, run client scripts.

Every spawned process has a timeout and is killed in teardown (``DaemonProc.kill``), so a failing
test never leaves a daemon behind on a 2-core CI box.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
ENV.pop("TIERSTORE_SECRET", None)
ENV.pop("TIERSTORE_SECRET_FILE", None)


def config_toml(path: Path, *, slot_bytes: int = 4096, dram_blocks: int = 2048,
                nvme_blocks: int = 0, metrics: bool = False,
                max_frame_bytes: int = 1 << 20, drain_timeout_s: float = 2.0) -> Path:
    text = f"""
    [daemon]
    max_frame_bytes = {max_frame_bytes}
    drain_timeout_s = {drain_timeout_s}
    [store]
    slot_bytes = {slot_bytes}
    [dram]
    capacity_blocks = {dram_blocks}
    """
    if nvme_blocks:
        text += f"""
    [nvme]
    capacity_blocks = {nvme_blocks}
    file_slots = 64
    """
    if metrics:
        text += """
    [metrics]
    enabled = true
    host = "127.0.0.1"
    port = 0
    """
    path.write_text(textwrap.dedent(text))
    return path


class DaemonProc:
    """A daemon started with ``python -m tierstore.daemon`` (foreground, own process)."""

    def __init__(self, data_dir: Path, socket: Path, config: Path) -> None:
        self.data_dir, self.socket, self.config = data_dir, socket, config
        self.log = data_dir.parent / f"daemon-{data_dir.name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 20.0) -> "DaemonProc":
        from tierstore.client.remote import RemoteClient
        from tierstore.errors import DaemonUnreachable

        logf = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tierstore.daemon", "--data-dir", str(self.data_dir),
             "--socket", str(self.socket), "--config", str(self.config)],
            stdout=logf, stderr=logf, env=ENV, cwd=str(ROOT))
        logf.close()
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}: {self.log_text()}")
            try:
                c = RemoteClient.connect(self.socket, timeout_s=1.0)
                ok = c.info["pid"] == self.proc.pid
                c.close()
                if ok:
                    return self
            except DaemonUnreachable:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"daemon did not answer in {timeout_s} s: {self.log_text()}")
            time.sleep(0.05)

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def terminate(self, timeout_s: float = 15.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)

    def kill(self) -> None:
        """Teardown: SIGTERM (clean stop), SIGKILL after 10 s; then remove a slab a killed
        daemon left in /dev/shm (nobody would restart it on this temp dir)."""
        stop_daemon(self.proc, self.data_dir)


def stop_process(proc: subprocess.Popen | None) -> None:
    """SIGTERM ``proc`` if it still runs, SIGKILL it after 10 s; returns once it has exited."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def stop_daemon(proc: subprocess.Popen | None, data_dir: Path) -> None:
    """Teardown of a daemon process: ``stop_process``, then remove any slab it left in
    /dev/shm for ``data_dir`` (nobody would restart it on this temp dir)."""
    stop_process(proc)
    from tierstore.daemon.server import shm_prefix

    prefix = shm_prefix(data_dir)
    for name in os.listdir("/dev/shm"):
        if name.startswith(prefix):
            try:
                os.unlink(os.path.join("/dev/shm", name))
            except OSError:
                pass


def python(code: str, *args: str, timeout_s: float = 30.0) -> subprocess.CompletedProcess:
    """Run a client script to completion (fails the test on a timeout)."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], env=ENV,
                          capture_output=True, text=True, timeout=timeout_s, cwd=str(ROOT))


def spawn_python(code: str, *args: str) -> subprocess.Popen:
    """Start a client script that keeps running; read its stdout line by line."""
    return subprocess.Popen([sys.executable, "-u", "-c", textwrap.dedent(code), *args], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=str(ROOT))


def read_line(proc: subprocess.Popen, timeout_s: float = 20.0) -> str:
    """Next stdout line of ``proc`` within ``timeout_s`` (kills it and fails otherwise)."""
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        if not sel.select(timeout_s):
            proc.kill()
            raise AssertionError(f"no output within {timeout_s} s; stderr: {proc.stderr.read()}")
        line = proc.stdout.readline()
        if not line:
            proc.wait(5)
            raise AssertionError(f"client exited ({proc.returncode}): {proc.stderr.read()}")
        return line.strip()
    finally:
        sel.close()


# Deterministic block contents, shared by writer and reader processes.
BLOCK_CODE = """
import hashlib
def block_bytes(i, size):
    d = hashlib.blake2b(i.to_bytes(8, "little"), digest_size=64).digest()
    return (d * (size // 64 + 1))[:size]
"""
