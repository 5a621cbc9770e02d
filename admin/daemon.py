"""``tierstore daemon start|stop|status`` and the live ``stats --watch`` view.

- ``start``: foreground by default (runs ``python -m tierstore.daemon`` in this process until
  SIGTERM or Ctrl-C, then stops cleanly: exit 0); ``--detach`` starts it as a child in its own
  session (output appended to ``<data_dir>/daemon.log``, pid file ``<data_dir>/daemon.pid``
  unless ``--pid-file``) and returns once the socket answers. Everything that can be checked
  before the daemon runs is checked first, with one error line and nothing written: the
  settings, the data dir (created, writable), the socket path (never a user's file: only a
  socket nobody serves is replaced).
- ``stop``: asks the daemon over its socket to take the SIGTERM path, then waits until it has
  released its data directory (store closed, LMDB closed, shared memory unlinked).
  ``--if-running``: nothing answering is fine (exit 0), for scripts.
- ``status``: the daemon's identity and a short summary; ``{"running": false}`` with ``--json``
  (and exit 3) when nothing answers.

Exit codes: tierstore_admin.output.EXIT_CODES (``status``: 1 when a tier is degraded). A thin
shell: parse, one client call, one output call.
"""

from __future__ import annotations

import fcntl
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from tierstore.errors import ConfigError, DaemonUnreachable, TierStoreError
from tierstore.units import format_bytes
from tierstore_admin.output import (stdout_console, EXIT_FAILED, EXIT_UNREACHABLE, EXIT_USAGE,
                                    JSON_HELP, emit, fail, kv_table, message, os_error_text,
                                    table)

daemon_app = typer.Typer(help="The per-node daemon (start, stop, status).", no_args_is_help=True)

SOCKET_ENV = "TIERSTORE_SOCKET"
DATA_DIR_ENV = "TIERSTORE_DATA_DIR"
CONFIG_ENV = "TIERSTORE_CONFIG"


def _socket_for(socket: Optional[str], data_dir: Optional[str], config: Optional[str] = None) -> str:
    if socket:
        return socket
    if not data_dir:
        fail(f"no socket: pass --socket or --data-dir (or set {SOCKET_ENV} / {DATA_DIR_ENV})")
    return str(Path(data_dir) / "ts.sock")


def open_client(**kw):
    """The daemon client (imported when a command runs: the CLI starts faster)."""
    from tierstore.client import open_client as _open

    return _open(**kw)


def _connect(sock: str, timeout_s: float = 5.0):
    try:
        return open_client(socket=sock, timeout_s=timeout_s)
    except DaemonUnreachable as e:
        fail(str(e), EXIT_UNREACHABLE)


@daemon_app.command("start")
def start(data_dir: Optional[str] = typer.Option(None, "--data-dir", envvar=DATA_DIR_ENV,
                                                 help="Store directory (created if missing)."),
          socket: Optional[str] = typer.Option(None, "--socket", envvar=SOCKET_ENV,
                                               help="Unix socket (default <data-dir>/ts.sock)."),
          config: Optional[str] = typer.Option(None, "--config", envvar=CONFIG_ENV,
                                               help="TOML settings file."),
          detach: bool = typer.Option(False, "--detach", help="Run in the background; return "
                                      "once the socket answers."),
          pid_file: Optional[str] = typer.Option(None, "--pid-file",
                                                 help="Pid file (default with --detach: "
                                                 "<data-dir>/daemon.pid)."),
          timeout_s: float = typer.Option(30.0, "--timeout", help="--detach: seconds to wait."),
          as_json: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """Start the daemon (foreground unless --detach)."""
    try:
        from tierstore.settings import load_settings

        settings = load_settings(config, data_dir=data_dir, socket=socket, pid_file=pid_file)
    except ConfigError as e:
        fail(str(e), EXIT_USAGE)
    if not settings.data_dir:
        fail(f"no data dir: pass --data-dir or set {DATA_DIR_ENV}", EXIT_USAGE)
    for w in settings.warnings:
        message("warning: " + w)
    sock = settings.resolved_socket()
    _check_paths(settings.data_dir, sock, detach, pid_file)
    argv = ["--data-dir", settings.data_dir, "--socket", sock]
    if config:
        argv += ["--config", config]
    if not detach:
        if pid_file:
            argv += ["--pid-file", pid_file]
        from tierstore.daemon.__main__ import main as daemon_main

        raise typer.Exit(daemon_main(argv))
    _start_detached(settings.data_dir, sock, argv, pid_file, timeout_s, as_json)


def _check_paths(data_dir: str, sock: str, detach: bool, pid_file: Optional[str]) -> None:
    """Refuse, with one line and exit 2, what would make the daemon fail on its paths: a data
    dir that cannot be created or written, a socket path that is not a socket."""
    d = Path(data_dir)
    try:
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        fail(f"cannot create data dir {d}: {os_error_text(e)}", EXIT_USAGE)
    if not d.is_dir():
        fail(f"data dir {d} is not a directory", EXIT_USAGE)
    if not os.access(d, os.W_OK | os.X_OK):
        fail(f"data dir {d} is not writable by this user", EXIT_USAGE)
    try:
        st = os.lstat(sock)
    except FileNotFoundError:
        st = None
    except OSError as e:
        fail(f"socket path {sock}: {os_error_text(e)}", EXIT_USAGE)
    if st is not None and not stat.S_ISSOCK(st.st_mode):
        fail(f"socket path {sock} exists and is not a socket; refusing to replace it (choose "
             "another --socket, or remove it yourself)", EXIT_USAGE)
    parent = Path(sock).parent
    if parent.exists() and not os.access(parent, os.W_OK | os.X_OK):
        fail(f"cannot create the socket in {parent}: not writable by this user", EXIT_USAGE)


def _start_detached(data_dir: str, sock: str, argv: list[str], pid_file: Optional[str],
                    timeout_s: float, as_json: bool) -> None:
    d = Path(data_dir)
    pid_path = Path(pid_file) if pid_file else d / "daemon.pid"
    log_path = d / "daemon.log"
    argv = argv + ["--pid-file", str(pid_path)]
    try:
        log = open(log_path, "ab")
    except OSError as e:
        fail(f"cannot write the daemon log {log_path}: {os_error_text(e)}", EXIT_USAGE)
    with log:
        log_start = log.tell()   # a failure reports this run's lines, not an earlier run's
        try:
            proc = subprocess.Popen([sys.executable, "-m", "tierstore.daemon", *argv],
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    start_new_session=True, close_fds=True,
                                    env=dict(os.environ, PYTHONPATH=_pythonpath()))
        except OSError as e:
            fail(f"cannot start the daemon: {os_error_text(e)}", EXIT_FAILED)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            rc = proc.poll()
            if rc is not None:
                fail(f"the daemon exited with code {rc} before answering: "
                     f"{_tail(log_path, log_start)} (log: {log_path})",
                     EXIT_USAGE if rc == 2 else EXIT_FAILED)
            try:
                with open_client(socket=sock, timeout_s=1.0) as c:
                    info = dict(c.info)
                if info.get("pid") == proc.pid:
                    break   # (another daemon on that socket makes our child exit: see poll above)
            except (DaemonUnreachable, TierStoreError):
                pass
            if time.monotonic() > deadline:
                proc.terminate()
                fail(f"the daemon did not answer on {sock} within {timeout_s:.0f} s "
                     f"(log: {log_path})", EXIT_FAILED)
            time.sleep(0.05)
    except KeyboardInterrupt:   # Ctrl-C while waiting: the daemon is not left half-started
        proc.terminate()
        raise
    out = {"pid": info["pid"], "socket": sock, "data_dir": info["data_dir"],
           "pid_file": str(pid_path), "log": str(log_path)}
    emit(out, as_json=as_json, human=lambda con, r: con.print(
        f"tierstore daemon started: pid {r['pid']}, socket {r['socket']}, log {r['log']}"))


def _pythonpath() -> str:
    """Keep the child importing this same tierstore (source checkouts run without install)."""
    import tierstore

    root = str(Path(tierstore.__file__).resolve().parent.parent)
    cur = os.environ.get("PYTHONPATH", "")
    return root if not cur else f"{root}{os.pathsep}{cur}"


def _tail(path: Path, start: int = 0, n: int = 3) -> str:
    """The last ``n`` non-empty lines written to ``path`` after byte ``start``."""
    try:
        with open(path, "rb") as f:
            f.seek(start)
            text = f.read().decode(errors="replace")
    except OSError:
        return "(no log)"
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return " | ".join(lines[-n:]) or "(nothing in the log)"


def _lock_released(data_dir: str) -> bool:
    try:
        fd = os.open(os.path.join(data_dir, "lock"), os.O_RDWR)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


@daemon_app.command("stop")
def stop(socket: Optional[str] = typer.Option(None, "--socket", envvar=SOCKET_ENV,
                                              help="The daemon's Unix socket."),
         data_dir: Optional[str] = typer.Option(None, "--data-dir", envvar=DATA_DIR_ENV,
                                                help="Find the socket as <data-dir>/ts.sock."),
         if_running: bool = typer.Option(False, "--if-running",
                                         help="Exit 0 also when no daemon answers (for scripts)."),
         timeout_s: float = typer.Option(60.0, "--timeout", help="Seconds to wait for the stop."),
         as_json: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """Stop the daemon cleanly (drain jobs, close the store); waits until it is gone."""
    sock = _socket_for(socket, data_dir)
    try:
        c = open_client(socket=sock, timeout_s=5.0)
    except DaemonUnreachable as e:
        if if_running:
            emit({"stopped": False, "running": False, "socket": sock}, as_json=as_json,
                 human=lambda con, r: con.print(f"no daemon answers on {sock}: nothing to stop"))
            return
        fail(str(e), EXIT_UNREACHABLE)
    info = dict(c.info)
    try:
        c.shutdown()
    except DaemonUnreachable:
        pass   # it closed the connection while answering: it is stopping
    finally:
        c.close()
    deadline = time.monotonic() + timeout_s
    while not _lock_released(info["data_dir"]):
        if time.monotonic() > deadline:
            fail(f"daemon pid {info['pid']} did not stop within {timeout_s:.0f} s", EXIT_FAILED)
        time.sleep(0.05)
    emit({"stopped": True, "pid": info["pid"], "socket": sock}, as_json=as_json,
         human=lambda con, r: con.print(f"tierstore daemon pid {r['pid']} stopped"))


@daemon_app.command("status")
def status(socket: Optional[str] = typer.Option(None, "--socket", envvar=SOCKET_ENV,
                                                help="The daemon's Unix socket."),
           data_dir: Optional[str] = typer.Option(None, "--data-dir", envvar=DATA_DIR_ENV,
                                                  help="Find the socket as <data-dir>/ts.sock."),
           as_json: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """Is a daemon running on the socket? (exit 3 when not)"""
    sock = _socket_for(socket, data_dir)
    try:
        with open_client(socket=sock, timeout_s=5.0) as c:
            st = c.stats()
            info = dict(c.info)
    except DaemonUnreachable as e:
        emit({"running": False, "socket": sock, "reason": str(e)}, as_json=as_json,
             human=lambda con, r: message(f"error: {r['reason']}"), code=EXIT_UNREACHABLE)
        return
    d = st.get("daemon", {})
    out = {"running": True, "pid": info["pid"], "version": info.get("server"),
           "protocol": info["version"], "socket": sock, "data_dir": info["data_dir"],
           "shm_name": info["shm_name"], "uptime_s": d.get("uptime_s"),
           "connections": d.get("connections"), "metrics": d.get("metrics"),
           "blocks": st["blocks"], "pins": st["pins"], "policies": st.get("policies"),
           "write_behind": st.get("write_behind"), "tiers": st["tiers"],
           "health": _health_line(st.get("health"))}
    # a degraded tier (its I/O fails: issue 13 item 10) is a failed status, exit 1
    emit(out, as_json=as_json, human=_human_status,
         code=EXIT_FAILED if out["health"] != "ok" else 0)


def _health_line(h: dict | None) -> str:
    """``ok``, or ``degraded: <tier>: <reason>; ...`` from ``stats()["health"]``."""
    if not h or h.get("status") == "ok":
        return "ok"
    bad = [f"{t}: {v.get('reason')}" for t, v in h.get("tiers", {}).items() if v.get("status") != "ok"]
    return "degraded: " + "; ".join(bad)


def _human_status(console, r: dict) -> None:
    rows = [("pid", str(r["pid"]))]   # an id, not a quantity: no thousands separator
    rows += [(k, r[k]) for k in ("health", "version", "socket", "data_dir", "shm_name", "uptime_s",
                                 "connections", "metrics", "blocks", "pins", "policies")]
    wb = r.get("write_behind")
    if wb:
        rows.append(("write-behind", f"{wb['queued_blocks']:,} queued, "
                                     f"{format_bytes(wb['unwritten_bytes'])} unwritten, "
                                     f"{wb['failed_blocks']:,} failed"))
    console.print(kv_table("tierstore daemon", rows))
    console.print(_tiers_table(r["tiers"]))


def _tiers_table(tiers: list[dict]):
    return table(None, ["tier", "blocks", "used / slots", "used", "capacity"],
                 [(t["tier"], t.get("blocks"), f"{t['used_slots']:,} / {t['slots']:,}",
                   format_bytes(t["used_bytes"]), format_bytes(t["capacity_bytes"]))
                  for t in tiers])


# ----------------------------------------------------------------------------- stats --watch
def watch_stats(get_stats: Callable[[], dict], *, interval_s: float = 1.0,
                iterations: Optional[int] = None, as_json: bool = False) -> None:
    """Live view of ``get_stats()`` (a client's ``stats``) every ``interval_s`` until Ctrl-C
    (or ``iterations``). With ``as_json``: one JSON object per line (for scripts). A daemon that
    goes away ends the watch with exit code 3."""
    import json

    from rich.live import Live

    prev: dict[str, Any] | None = None
    t_prev = time.monotonic()
    n = 0
    # a live view redraws in place on a terminal; piped output gets one table per refresh
    live = None
    if not as_json and sys.stdout.isatty():
        live = Live(console=stdout_console(), auto_refresh=False, transient=False)
    try:
        if live is not None:
            live.start()
        while iterations is None or n < iterations:
            try:
                st = get_stats()
            except DaemonUnreachable as e:
                fail(str(e), EXIT_UNREACHABLE)
            now = time.monotonic()
            rates = _rates(prev, st.get("counters", {}), now - t_prev) if prev is not None else {}
            prev, t_prev = dict(st.get("counters", {})), now
            if as_json:
                sys.stdout.write(json.dumps({"stats": st, "rates_per_s": rates}) + "\n")
                sys.stdout.flush()
            elif live is not None:
                live.update(_watch_view(st, rates), refresh=True)
            else:
                stdout_console().print(_watch_view(st, rates))
            n += 1
            if iterations is None or n < iterations:
                time.sleep(interval_s)
    finally:   # Ctrl-C ends the watch with exit 130 (tierstore_admin.app)
        if live is not None:
            live.stop()


def _rates(prev: dict, cur: dict, dt: float) -> dict:
    dt = max(dt, 1e-6)
    return {k: round((v - prev.get(k, 0)) / dt, 1) for k, v in cur.items()
            if isinstance(v, (int, float)) and v != prev.get(k, 0)}


def _watch_view(st: dict, rates: dict):
    from rich.console import Group

    head = kv_table("tierstore stats", [("blocks", st.get("blocks")), ("pins", st.get("pins")),
                                        ("pending stores", st.get("pending_stores")),
                                        ("pending loads", st.get("pending_loads"))])
    rate_rows = sorted(rates.items())[:20]
    return Group(head, _tiers_table(st.get("tiers", [])),
                 table("per second", ["counter", "rate"], rate_rows or [("-", 0)]))


@daemon_app.command("watch", hidden=True)
def watch(socket: Optional[str] = typer.Option(None, "--socket", envvar=SOCKET_ENV),
          data_dir: Optional[str] = typer.Option(None, "--data-dir", envvar=DATA_DIR_ENV),
          interval_s: float = typer.Option(1.0, "--interval"),
          iterations: Optional[int] = typer.Option(None, "--count"),
          as_json: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """Live stats of a running daemon (what ``tierstore stats --watch`` shows)."""
    with _connect(_socket_for(socket, data_dir)) as c:
        watch_stats(c.stats, interval_s=interval_s, iterations=iterations, as_json=as_json)
