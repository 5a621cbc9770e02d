"""Peer transfer: sessions (auth + negotiation), transports (tcp, rdma, loopback), peer server
and fetcher. See transport.py for the job contract, peer_frames.py for the frames,
peer_server.py and fetcher.py for the seams the daemon and the vLLM connector use. Nothing here imports pyverbs at
import time (only transfer/verbs.py does, lazily)."""

from tierstore.transfer.transport import (AuthFailed, JobState, OutOfRange, ReadJob, Slab, Transport,
                                     TransportUnavailable)
from tierstore.transfer.fetcher import Fetch, PeerClient
from tierstore.transfer.peer_server import PeerServer, StoreProvider
from tierstore.transfer.session import PeerSettings, PeerStats

__all__ = ["AuthFailed", "Fetch", "JobState", "OutOfRange", "PeerClient", "PeerServer",
           "PeerSettings", "PeerStats", "ReadJob", "Slab", "StoreProvider", "Transport",
           "TransportUnavailable"]
