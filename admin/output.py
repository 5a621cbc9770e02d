"""Output of the ``tierstore`` CLI: one call per command, data on stdout, the rest on stderr.

Every command ends in exactly one :func:`emit`: with ``--json`` the result is printed as one JSON
object on stdout (nothing else goes to stdout); otherwise a human renderer draws rich tables on
stdout. Messages, warnings, progress and errors go to stderr.

Exit codes (DESIGN §9), relied on by scripts::

    0  ok
    1  the command ran and failed, or found problems (check)
    2  usage or bad input: bad flag, capacity string, trace line, missing or busy data dir
    3  a daemon was asked for (--socket) and cannot be reached

A user error is one line on stderr, ``error: <message>``, never a traceback.
"""

from __future__ import annotations

import json
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

JSON_HELP = "Print the result as one JSON object on stdout."


def stdout_console() -> Console:
    # markup, emoji codes and highlighting off: block listings carry strings that clients chose
    # (model names, session names); "[/x]" or ":b:" must print as themselves, never as markup
    return Console(soft_wrap=False, markup=False, emoji=False, highlight=False)


def stderr_console() -> Console:
    return Console(stderr=True, markup=False, emoji=False, highlight=False)


def message(text: str) -> None:
    """One line for a person, on stderr."""
    print(text, file=sys.stderr, flush=True)


def fail(text: str, code: int = EXIT_USAGE) -> NoReturn:
    """Print ``error: text`` (one line) on stderr and exit with ``code``."""
    message("error: " + " ".join(str(text).split()))
    raise typer.Exit(code)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn tierstore's errors into one stderr line and an exit code (2 for bad input, else 1)."""
    try:
        yield
    except DaemonUnreachable as e:
        fail(str(e), EXIT_UNREACHABLE)
    except (ConfigError, FormatError) as e:
        fail(str(e), EXIT_USAGE)
    except TierStoreError as e:
        fail(f"{type(e).__name__}: {e}", EXIT_FAILED)
    except OSError as e:
        fail(f"{e.strerror or e}{': ' + str(e.filename) if e.filename else ''}", EXIT_FAILED)


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
def kv_table(title: str, rows: Iterable[tuple[str, Any]]) -> Table:
    t = Table(title=title, show_header=False, title_justify="left")
    t.add_column("field", style="bold")
    t.add_column("value", overflow="fold")
    for k, v in rows:
        t.add_row(k, fmt(v))
    return t


def table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> Table:
    t = Table(title=title, title_justify="left")
    for c in columns:
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(*(fmt(v) for v in r))
    return t


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:,.1f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    if isinstance(v, (list, tuple)):
        return ", ".join(fmt(x) for x in v)
    if isinstance(v, dict):
        return ", ".join(f"{k}={fmt(x)}" for k, x in v.items())
    return str(v)
