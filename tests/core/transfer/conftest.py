"""Fixtures for the transfer tests (helpers live in transfer_support.py)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from transfer_support import TRANSPORTS, Pair  # noqa: E402


@pytest.fixture(params=TRANSPORTS)
def transport(request):
    return request.param


@pytest.fixture
def pair_factory():
    made = []

    def make(*a, **kw):
        p = Pair(*a, **kw)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()
