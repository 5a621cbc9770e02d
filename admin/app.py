"""The ``tierstore`` command line (DESIGN §9): noun then verb, ``--json`` everywhere.

A thin shell: each command parses its flags, makes one client call and one output call
(:mod:`tierstore_admin.output`). ``main`` is the console script; it turns click's usage errors
into one stderr line and exit code 2.

    tierstore replay [TRACE]        trace replay through the real store (tierstore/replay.py)
    tierstore tiers usage           per-tier capacity and use of a data dir
    tierstore blocks ls|show|evict  resident blocks of a data dir
    tierstore check [--fix]         verify a data dir (exit 1 when it finds problems)
    tierstore stats [--watch]       counters and per-tier use
    tierstore daemon start|stop|status   the per-node daemon (tierstore/daemon/)
    tierstore peers ls|ping         the daemon's peers: transport, state, latency, bytes moved

Commands that inspect a store take ``--socket`` (through the daemon) or ``--data-dir``.
"""

from __future__ import annotations

import sys
from typing import Sequence

import typer

from tierstore_admin import blocks, check, daemon, peers, replay, stats, tiers
from tierstore_admin.output import EXIT_USAGE, message

# typer >= 0.2x vendors click; take the exception bases from typer's own classes so that this works
# with either the vendored or the standalone click.
_ClickException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
_UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")

app = typer.Typer(name="tierstore", help="A tiered KV-cache store for LLM inference.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
app.command("replay")(replay.replay_cmd)
app.add_typer(tiers.app, name="tiers")
app.add_typer(blocks.app, name="blocks")
app.command("check")(check.check_cmd)
app.command("stats")(stats.stats_cmd)
app.add_typer(daemon.daemon_app, name="daemon")
app.add_typer(peers.app, name="peers")


def main(argv: Sequence[str] | None = None) -> None:
    """Console script entry: run the app, exit with its code."""
    cmd = typer.main.get_command(app)
    try:
        rc = cmd.main(args=list(argv) if argv is not None else None, prog_name="tierstore",
                      standalone_mode=False)
    except _UsageError as e:
        if type(e).__name__ == "NoArgsIsHelpError":   # bare `tierstore` or `tierstore blocks`
            e.show()
        else:
            where = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
            message("error: " + " ".join(e.format_message().split()) + where)
        rc = EXIT_USAGE
    except typer.Abort:
        message("aborted")
        rc = 1
    except _ClickException as e:
        message("error: " + " ".join(e.format_message().split()))
        rc = e.exit_code
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
