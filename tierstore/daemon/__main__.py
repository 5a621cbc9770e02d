"""``python -m tierstore.daemon``: run the daemon in the foreground until SIGTERM/SIGINT/SHUTDOWN.

The CLI's ``tierstore daemon start`` runs this (directly, or as a detached child with
``--detach``). Exit codes: 0 after a clean stop, 2 for a configuration problem (including a data
dir already owned by another daemon), 1 for anything else.
"""

from __future__ import annotations

import argparse
import logging
import sys

from tierstore.errors import ConfigError, TierStoreError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tierstore.daemon", description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", help="store directory (env TIERSTORE_DATA_DIR)")
    p.add_argument("--socket", help="Unix socket path (env TIERSTORE_SOCKET; default <data-dir>/ts.sock)")
    p.add_argument("--config", help="TOML settings file (env TIERSTORE_CONFIG)")
    p.add_argument("--pid-file", help="write the pid here, remove it on stop")
    p.add_argument("--log-level", help="debug, info, warning, error")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import prometheus_client  # noqa: F401  (the daemon's counters and exporter)
    except ImportError:
        print("tierstore-daemon: the daemon needs prometheus-client: pip install 'tierstore[metrics]'",
              file=sys.stderr)
        return 2
    from tierstore.daemon.server import DaemonServer
    from tierstore.settings import load_settings

    try:
        settings = load_settings(args.config, data_dir=args.data_dir, socket=args.socket,
                                 pid_file=args.pid_file, log_level=args.log_level)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    level = settings.log_level.upper()
    logging.basicConfig(level=getattr(logging, level, logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    server = DaemonServer(settings)
    try:
        server.start()
    except ConfigError as e:   # DataDirBusy is a ConfigError: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (TierStoreError, OSError) as e:
        print(f"error: cannot start the daemon: {e}", file=sys.stderr)
        return 1
    server.install_signal_handlers()
    print(f"tierstore daemon ready on {server.socket_path}", file=sys.stderr, flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
