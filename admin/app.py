"""The ``tierstore`` command line (DESIGN §9): noun then verb, ``--json`` everywhere.

A thin shell: each command parses its flags, makes one client call and one output call
(:mod:`tierstore_admin.output`). ``main`` is the console script; it turns click's usage errors
into one error line and exit code 2, and Ctrl-C into exit code 130.

    tierstore replay [TRACE]        the main job: a trace through the real store (tierstore/sim/replay.py)
    tierstore tiers ls|usage        the tiers of a store: their settings, their use
    tierstore blocks ls|show|evict|pin|unpin   resident blocks
    tierstore flush                 wait until every stored block has its NVMe copy
    tierstore check [--fix]         verify a store (exit 1 when it finds problems)
    tierstore stats [--watch]       counters and per-tier use
    tierstore config show           every setting's effective value and where it came from
    tierstore daemon start|stop|status   the per-node daemon (tierstore/daemon/)
    tierstore peers ls|ping         the daemon's peers: transport, state, latency, bytes moved

Commands that inspect a store take ``--socket`` (through the daemon) or ``--data-dir``.
"""

from __future__ import annotations

import sys
from typing import Sequence

import typer

from tierstore import __version__
from tierstore_admin import blocks, check, config, daemon, flush, peers, replay, stats, tiers
from tierstore_admin.output import (EXIT_CODES, EXIT_INTERRUPTED, EXIT_USAGE, STATE, no_color,
                                    report_error)

# typer >= 0.2x vendors click; take the exception bases from typer's own classes so that this works
# with either the vendored or the standalone click.
_ClickException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
_UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")

EPILOG = "Exit codes, the same for every command:\n\n" + "\n\n".join(
    f"{code} {kind}: {meaning}" for code, kind, meaning in EXIT_CODES)

app = typer.Typer(name="tierstore", help="A tiered KV-cache store for LLM inference.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


def _version(value: bool) -> None:
    if value:
        print(f"tierstore {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(version: bool = typer.Option(False, "--version", is_eager=True, callback=_version,
                                       help="Print the version and exit.")) -> None:
    """A tiered KV-cache store for LLM inference."""


app.command("replay")(replay.replay_cmd)
app.add_typer(tiers.app, name="tiers")
app.add_typer(blocks.app, name="blocks")
app.command("flush")(flush.flush_cmd)
app.command("check")(check.check_cmd)
app.command("stats")(stats.stats_cmd)
app.add_typer(config.app, name="config")
app.add_typer(daemon.daemon_app, name="daemon")
app.add_typer(peers.app, name="peers")


def _with_epilog(cmd) -> None:
    """Every command's ``--help`` ends with the exit-code table."""
    cmd.epilog = EPILOG
    for sub in getattr(cmd, "commands", {}).values():
        _with_epilog(sub)


def command():
    cmd = typer.main.get_command(app)
    _with_epilog(cmd)
    return cmd


def main(argv: Sequence[str] | None = None) -> None:
    """Console script entry: run the app, exit with its code."""
    args = list(sys.argv[1:] if argv is None else argv)
    STATE.json = "--json" in args
    if no_color():
        import typer.rich_utils as ru
        ru.COLOR_SYSTEM = None   # typer's help and error panels: no ANSI attribute either
    cmd = command()
    try:
        rc = cmd.main(args=args, prog_name="tierstore", standalone_mode=False)
    except _UsageError as e:
        if type(e).__name__ == "NoArgsIsHelpError":   # bare `tierstore` or `tierstore blocks`
            e.show()
        else:
            where = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
            report_error(" ".join(e.format_message().split()) + where, EXIT_USAGE)
        rc = EXIT_USAGE
    except (typer.Abort, KeyboardInterrupt):   # click turns Ctrl-C (and EOF at a prompt) into Abort
        report_error("interrupted", EXIT_INTERRUPTED)
        rc = EXIT_INTERRUPTED
    except _ClickException as e:
        report_error(" ".join(e.format_message().split()), e.exit_code)
        rc = e.exit_code
    if rc == EXIT_INTERRUPTED:   # typer turns Ctrl-C into a silent Exit(130): say so
        report_error("interrupted", EXIT_INTERRUPTED)
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
