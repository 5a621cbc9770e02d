"""Packaging: every package folder ships, admin/ and plugins/ keep their distinct import names."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAPPING = {"tierstore": "tierstore", "admin": "tierstore_admin", "plugins": "tierstore_plugins"}


def test_every_package_folder_is_listed_in_pyproject():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert cfg["package-dir"] == {v: k for k, v in MAPPING.items()}
    listed = set(cfg["packages"])
    found = set()
    for folder, name in MAPPING.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((name, *rel)))
    assert found - listed == set(), f"package folders missing from pyproject packages: {found - listed}"
    assert listed - found == set(), f"pyproject lists packages that do not exist: {listed - found}"


def test_core_imports_neither_typer_nor_vllm():
    """Heavy dependencies stay at the leaves (STYLE.md 9): the core never imports typer/rich or
    vLLM; torch only where bytes meet a device."""
    torch_ok = {"io/copy.py", "io/hostcopy.py", "tiers/hbm.py", "tiers/pinning.py"}
    for py in (ROOT / "tierstore").rglob("*.py"):
        text = py.read_text()
        rel = py.relative_to(ROOT / "tierstore").as_posix()
        for mod in ("typer", "rich", "vllm"):
            assert f"import {mod}" not in text and f"from {mod}" not in text, (rel, mod)
        if rel not in torch_ok:
            assert "import torch" not in text, rel


def test_the_library_imports_without_its_extras():
    """``cli`` (typer, rich) and ``metrics`` (prometheus-client) are extras: the library's entry
    points import none of them, nor aiofiles (not a dependency: the README says why)."""
    import subprocess
    import sys

    code = ("import sys, tierstore, tierstore.client, tierstore.client.remote, tierstore.store\n"
            "print(sorted(m for m in ('typer', 'rich', 'prometheus_client', 'aiofiles')"
            " if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         check=True).stdout
    assert out.strip() == "[]"
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = " ".join(cfg["dependencies"])
    for dep in ("typer", "rich", "prometheus-client", "aiofiles"):
        assert dep not in core, dep
    extras = cfg["optional-dependencies"]
    assert "tierstore[cli,metrics]" in extras["dev"]   # `pip install -e '.[dev]'` gets everything


def test_the_command_without_the_cli_extra_says_what_to_install():
    """The console script (``tierstore_admin:main``) on an install without typer/rich: one line
    naming the extra and exit 2, not a traceback (a fresh-clone user found the traceback)."""
    import subprocess
    import sys

    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert cfg["scripts"]["tierstore"] == "tierstore_admin:main"
    code = "import sys; sys.modules['typer'] = None\nfrom tierstore_admin import main; main()"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2, r.stderr
    assert "pip install 'tierstore[cli]'" in r.stderr and "Traceback" not in r.stderr
