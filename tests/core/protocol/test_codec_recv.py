"""recv_exact: memory follows the bytes that arrived, not the length a peer claims."""

import socket
import threading
import tracemalloc

import pytest

from tierstore.protocol.codec import recv_exact


def test_claimed_length_does_not_allocate_up_front():
    """A peer that announces 16 MiB and sends 10 bytes costs about one 1 MiB step, and the
    short read is a ConnectionError (adversarial finding: 17 bytes made the daemon commit 16 MiB)."""
    a, b = socket.socketpair()
    try:
        b.sendall(b"x" * 10)
        b.close()
        tracemalloc.start()
        with pytest.raises(ConnectionError):
            recv_exact(a, 16 << 20)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 3 << 20
    finally:
        a.close()


def test_large_frame_arrives_whole():
    a, b = socket.socketpair()
    data = bytes(range(256)) * (12 << 12)   # 12 MiB, several growth steps
    t = threading.Thread(target=b.sendall, args=(data,))
    t.start()
    try:
        got = recv_exact(a, len(data))
        assert bytes(got) == data
        assert recv_exact(a, 0) == b""
    finally:
        t.join()
        a.close()
        b.close()
