"""The library must import on every Python pyproject admits (``requires-python = ">=3.10"``).

tierstore/tiers/health.py (today's DiskError) does ``from enum import StrEnum``, which exists
only from Python 3.11. health.py is imported by tiers/slot_tier.py, so on 3.10 ``import
tierstore.store`` (and with it the vLLM connector, which vLLM runs on 3.10) fails with
ImportError. Before today only tierstore.settings (the daemon) needed 3.11; the embedded store
imported on 3.10. The test hides ``enum.StrEnum`` in a child interpreter to stand for 3.10
(this machine has only 3.11) and checks that the labels stay the plain values.
"""

import subprocess
import sys

CODE = r"""
import enum
del enum.StrEnum                     # what Python 3.10's enum module looks like
import tierstore.store               # noqa: F401
from tierstore.tiers.slot_tier import DiskError, DiskResult
from tierstore import counter_names as cn
assert str(DiskError.ENOSPC) == "enospc", str(DiskError.ENOSPC)
assert f"{DiskError.EIO}" == "eio"
assert DiskError("corrupt") is DiskError.CORRUPT
assert DiskError.META == "meta"
assert cn.nvme_write_error(DiskError.ENOSPC) == "nvme_write_enospc"
assert DiskResult(False, error="eio").error is DiskError.EIO
print("ok")
"""


def test_store_imports_without_enum_strenum():
    cp = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=120)
    assert cp.returncode == 0, cp.stderr[-2000:]
    assert cp.stdout.strip() == "ok"
