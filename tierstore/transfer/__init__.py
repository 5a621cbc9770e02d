"""Peer transfer: sessions (auth + negotiation), transports (tcp, rdma, loopback), peer server
and client. See base.py for the job contract, protocol.py for the frames, server.py and
client.py for the seams the daemon and the vLLM connector use. Nothing here imports pyverbs at
import time (only transfer/verbs.py does, lazily)."""

from tierstore.transfer.base import (AuthFailed, JobState, OutOfRange, ReadJob, Slab, Transport,
                                     TransportUnavailable)
from tierstore.transfer.client import Fetch, PeerClient
from tierstore.transfer.server import PeerServer, StoreProvider
from tierstore.transfer.session import PeerSettings, PeerStats

__all__ = ["AuthFailed", "Fetch", "JobState", "OutOfRange", "PeerClient", "PeerServer",
           "PeerSettings", "PeerStats", "ReadJob", "Slab", "StoreProvider", "Transport",
           "TransportUnavailable"]
