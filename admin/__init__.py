"""The ``tierstore`` command line (installed as ``tierstore_admin``; the commands are in app.py).

:func:`main` is the console script's entry: it imports the CLI only when called, so that an
install without the ``cli`` extra (typer, rich) answers with one line saying what to install
instead of a traceback.
"""

import sys


def main() -> None:
    """Run the ``tierstore`` command; exit 2 with an install hint when typer/rich are missing."""
    try:
        from tierstore_admin.app import main as run
    except ModuleNotFoundError as e:
        if e.name in ("typer", "rich", "click"):
            print(f"error: the tierstore command needs the 'cli' extra ({e.name} is not "
                  "installed): pip install 'tierstore[cli]'", file=sys.stderr)
            sys.exit(2)
        raise
    run()
