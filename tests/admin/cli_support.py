"""Running the real `tierstore` entry point in a subprocess (issue 14: CLI tests see what a user
sees: exit codes, stdout vs stderr, terminals, signals, the environment), and a daemon started
with `tierstore daemon start --detach`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path


def tierstore_argv() -> list[str]:
    script = Path(sys.executable).parent / "tierstore"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "tierstore_admin.app"]   # a checkout run without the script


def clean_env(**extra: str) -> dict:
    """The environment of a CLI run: no TIERSTORE_* or colour settings of the caller's."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("TIERSTORE_") and k not in ("NO_COLOR", "FORCE_COLOR", "COLUMNS")}
    env.update(extra)
    return env


class Proc:
    """Outcome of one `tierstore` subprocess."""

    def __init__(self, cp: subprocess.CompletedProcess) -> None:
        self.code, self.stdout, self.stderr = cp.returncode, cp.stdout, cp.stderr

    def json(self):
        return json.loads(self.stdout)

    def __repr__(self) -> str:
        return f"exit {self.code}\nstdout: {self.stdout[-2000:]}\nstderr: {self.stderr[-2000:]}"


def run_tierstore(*args, env: dict | None = None, cwd=None, timeout: float = 120,
                  input: str | None = None) -> Proc:
    cp = subprocess.run([*tierstore_argv(), *[str(a) for a in args]], capture_output=True,
                        text=True, env=clean_env() if env is None else env, cwd=cwd,
                        timeout=timeout, input=input, stdin=None if input is not None else subprocess.DEVNULL)
    return Proc(cp)


def write_config(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


SMALL_DAEMON = """
    [store]
    slot_bytes = "64KiB"
    [dram]
    capacity = "64blocks"
    [nvme]
    capacity = "512blocks"
    """


class CliDaemon:
    """A daemon started with `tierstore daemon start --detach` (stopped in teardown)."""

    def __init__(self, root: Path, config_text: str = SMALL_DAEMON, name: str = "d") -> None:
        self.data_dir = root / name
        self.socket = self.data_dir / "ts.sock"
        self.config = write_config(root / f"{name}.toml", config_text)
        self.pid: int | None = None

    def start(self, *extra, env: dict | None = None) -> "CliDaemon":
        r = run_tierstore("daemon", "start", "--data-dir", self.data_dir, "--config", self.config,
                          "--detach", "--json", *extra, env=env)
        assert r.code == 0, r
        self.pid = r.json()["pid"]
        return self

    def stop(self) -> None:
        if self.socket.exists():   # a clean stop removed it already
            run_tierstore("daemon", "stop", "--socket", self.socket, "--if-running", timeout=60)
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.pid = None
        from tierstore.daemon.server import shm_prefix
        prefix = shm_prefix(self.data_dir)
        for n in os.listdir("/dev/shm"):
            if n.startswith(prefix):
                try:
                    os.unlink(os.path.join("/dev/shm", n))
                except OSError:
                    pass
