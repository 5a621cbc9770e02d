"""Output of the ``tierstore`` CLI: one call per command, data on stdout, the rest on stderr.

Every command ends in exactly one :func:`emit`: with ``--json`` the result is printed as one JSON
object on stdout (nothing else goes to stdout); otherwise a human renderer draws tables on
stdout. Messages, warnings, progress and errors go to stderr. An error is one line on stderr,
``error: <message>``, never a traceback; with ``--json`` it is also one JSON object on stdout,
``{"error": {"code": N, "kind": "...", "message": "..."}}``, so a script always gets JSON.

Exit codes (:data:`EXIT_CODES`; DESIGN §9), the same for every command, relied on by scripts:
the README, docs/operations.md and ``tierstore --help`` show this one table.

Terminals: output that is not a terminal is never wrapped (tables take the width they need);
``NO_COLOR`` (any non-empty value) turns off every ANSI attribute, bold and italic included.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, NoReturn, Sequence

import typer
from rich.console import Console
from rich.table import Table

from tierstore.errors import ConfigError, DaemonUnreachable, FormatError, TierStoreError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_INTERRUPTED = 130

EXIT_CODES: tuple[tuple[int, str, str], ...] = (
    (EXIT_OK, "ok", "the command did what was asked"),
    (EXIT_FAILED, "failed", "it ran but did not do all of it: a block missing, pinned or not in "
                            "that tier; problems found (and left, after `check --fix`); a flush "
                            "that did not finish; a daemon that did not come up"),
    (EXIT_USAGE, "usage", "bad input, nothing was done: a bad flag, setting, capacity or trace "
                          "line; a data dir or socket path that cannot be used (missing, busy, "
                          "not writable, not a socket)"),
    (EXIT_UNREACHABLE, "unreachable", "a daemon was asked for (--socket) and none answers"),
    (EXIT_INTERRUPTED, "interrupted", "Ctrl-C (SIGINT); a foreground `daemon start` stops "
                                      "cleanly and exits 0 instead"),
)
KIND = {code: kind for code, kind, _ in EXIT_CODES}

JSON_HELP = "Print the result as one JSON object on stdout (errors too)."


def exit_codes_text() -> str:
    """The table for ``--help`` (plain lines)."""
    return "Exit codes: " + "; ".join(f"{c} {k}: {m}" for c, k, m in EXIT_CODES) + "."


def exit_codes_markdown() -> str:
    """The table for README.md and docs/operations.md (a test compares them with this)."""
    rows = ["| code | meaning | when |", "|---|---|---|"]
    rows += [f"| {c} | {k} | {m} |" for c, k, m in EXIT_CODES]
    return "\n".join(rows)


# ------------------------------------------------------------------------------ state
class _State:
    json = False   # set by app.main when --json is on the command line


STATE = _State()


def no_color() -> bool:
    return bool(os.environ.get("NO_COLOR"))


def _console(stderr: bool) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    tty = stream.isatty()
    # markup, emoji codes and highlighting off: block listings carry strings that clients chose
    # (model names, session names); "[/x]" or ":b:" must print as themselves, never as markup
    kw: dict[str, Any] = dict(stderr=stderr, markup=False, emoji=False, highlight=False)
    if no_color():
        kw["color_system"] = None    # no ANSI attribute at all: no colour, no bold, no italic
    if not tty:
        kw["width"] = 100_000        # never wrap what goes to a file or a pipe
        kw["color_system"] = None
    return Console(soft_wrap=not tty, **kw)


def stdout_console() -> Console:
    return _console(stderr=False)


def stderr_console() -> Console:
    return _console(stderr=True)


def message(text: str) -> None:
    """One line for a person, on stderr."""
    print(text, file=sys.stderr, flush=True)


def error_object(text: str, code: int) -> dict:
    return {"error": {"code": code, "kind": KIND.get(code, "failed"), "message": text}}


def report_error(text: str, code: int) -> None:
    """``error: text`` on stderr (one line); with ``--json`` also the error object on stdout."""
    line = " ".join(str(text).split())
    message("error: " + line)
    if STATE.json:
        sys.stdout.write(json.dumps(error_object(line, code)) + "\n")
        sys.stdout.flush()


def fail(text: str, code: int = EXIT_USAGE) -> NoReturn:
    """Report ``text`` as an error (see :func:`report_error`) and exit with ``code``."""
    report_error(text, code)
    raise typer.Exit(code)


def os_error_text(e: OSError) -> str:
    return f"{e.strerror or e}{': ' + str(e.filename) if e.filename else ''}"


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn tierstore's errors into one error line and an exit code (2 for bad input, else 1)."""
    try:
        yield
    except DaemonUnreachable as e:
        fail(str(e), EXIT_UNREACHABLE)
    except (ConfigError, FormatError) as e:
        fail(str(e), EXIT_USAGE)
    except TierStoreError as e:
        fail(f"{type(e).__name__}: {e}", EXIT_FAILED)
    except OSError as e:
        fail(os_error_text(e), EXIT_FAILED)


def emit(data: Any, *, as_json: bool, human: Callable[[Console, Any], None] | None = None,
         code: int = EXIT_OK) -> None:
    """The one output call of a command. Exits with ``code`` when it is not 0."""
    if as_json:
        sys.stdout.write(json.dumps(data, default=str, sort_keys=False) + "\n")
        sys.stdout.flush()
    elif human is not None:
        human(stdout_console(), data)
    else:
        stdout_console().print_json(json.dumps(data, default=str))
    if code:
        raise typer.Exit(code)


# ------------------------------------------------------------------------- table helpers
def _plain() -> bool:
    return no_color() or not sys.stdout.isatty()


def kv_table(title: str, rows: Iterable[tuple[str, Any]]) -> Table:
    plain = _plain()
    t = Table(title=title, show_header=False, title_justify="left",
              title_style="" if plain else None)
    t.add_column("field", style="" if plain else "bold")
    t.add_column("value", overflow="fold")
    for k, v in rows:
        t.add_row(k, fmt(v))
    return t


def table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> Table:
    plain = _plain()
    t = Table(title=title, title_justify="left", title_style="" if plain else None,
              header_style="" if plain else "bold")
    for c in columns:
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(*(fmt(v) for v in r))
    return t


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:,.1f}"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, (list, tuple)):
        return ", ".join(fmt(x) for x in v)
    if isinstance(v, dict):
        return ", ".join(f"{k}={fmt(x)}" for k, x in v.items())
    return str(v)
