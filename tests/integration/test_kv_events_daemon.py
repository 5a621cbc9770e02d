"""KV events end to end through a real daemon process (issue 15 item 1, case EVT-37): a ZMQ SUB
subscriber that knows nothing but the event stream ends with the same engine hash -> media index
that ``blocks ls`` reports, after stores, promotions and evictions; after a ``kill -9`` and a
restart (a new epoch: cleared, then NVMe survivors re-announced); and a subscriber that joins late
catches up through the replay socket. (tests/plugins/test_vllm_kv_events.py does the same with a
vLLM engine and vLLM's own event classes.)"""

from __future__ import annotations

import json
import signal
import socket
import sys
import textwrap
from pathlib import Path

import pytest

zmq = pytest.importorskip("zmq")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from daemon_support import DaemonProc  # noqa: E402
from kv_events_support import Subscriber, settle  # noqa: E402

from tierstore.daemon.publisher import EPOCH_SHIFT  # noqa: E402
from tierstore.client.remote import RemoteClient  # noqa: E402
from tierstore.events import engine_block  # noqa: E402
from tierstore.keys import Namespace  # noqa: E402
from tierstore.kv_events import media_of_blocks  # noqa: E402

NS = Namespace(model="m", block_size=16, kv_dtype="bfloat16", num_layers=2, num_kv_heads=2,
               head_size=8)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def events_config(path: Path, pub: int, rep: int) -> Path:
    path.write_text(textwrap.dedent(f"""
        [store]
        slot_bytes = 4096
        [dram]
        capacity_blocks = 48
        [nvme]
        capacity_blocks = 160
        [events]
        enabled = true
        endpoint = "tcp://127.0.0.1:{pub}"
        replay_endpoint = "tcp://127.0.0.1:{rep}"
        heartbeat_s = 0.3
        """))
    return path


def ehash(i: int) -> bytes:
    return i.to_bytes(8, "big") * 4


def run_requests(c: RemoteClient, n: int) -> None:
    """n requests of 4-8 blocks over 12 shared prefixes: store the misses (with engine hashes
    as vLLM's connector passes them), load the hits (promotions from NVMe)."""
    import random

    rng = random.Random(3)
    kr = c.keyer(NS)
    for r in range(n):
        base = rng.randrange(12) * 1000
        ids = [base + j for j in range(rng.randrange(4, 9))]
        if rng.random() < 0.5:
            ids += [100_000 + r * 10 + j for j in range(2)]
        keys = kr.chain_from_block_ids(ids)
        hit = c.lookup(keys, NS).num_blocks
        if hit:
            job = c.prepare_load(keys[:hit])
            c.complete_load(job.job_id)
        if hit < len(keys):
            eng = [engine_block(ehash(i), ehash(ids[j - 1]) if j else None,
                                list(range(16)), 16) for j, i in enumerate(ids)][hit:]
            job = c.prepare_store(keys[hit:], NS, 1024, parent=keys[hit - 1] if hit else None,
                                  engine=eng, wait_s=10)
            for s in job.slots:
                if s is not None:
                    c.slot_view(s)[:1024] = b"k" * 1024
            c.complete_store(job.job_id, True)


def blocks_ls(sock: Path) -> dict:
    """What ``tierstore blocks ls --json`` reports, as engine hash -> media."""
    from tierstore_admin.app import app
    from typer.testing import CliRunner

    r = CliRunner().invoke(app, ["blocks", "ls", "--socket", str(sock), "--json",
                                 "--limit", "100000"])
    assert r.exit_code == 0, r.output
    return media_of_blocks(json.loads(r.stdout)["blocks"])


def test_subscriber_index_equals_blocks_ls_across_kill9_and_late_join(tmp_path):
    """EVT-37 (a)-(d) against a daemon process: 200 requests (stores, promotions, DRAM and NVMe
    evictions), then kill -9 and restart, then a late subscriber through the replay socket."""
    pub, rep = free_port(), free_port()
    cfg = events_config(tmp_path / "ts.toml", pub, rep)
    d = DaemonProc(tmp_path / "data", tmp_path / "run" / "ts.sock", cfg).start()
    sub = late = None
    try:
        sub = Subscriber(f"tcp://127.0.0.1:{pub}", f"tcp://127.0.0.1:{rep}", catch_up=True)
        c = RemoteClient.connect(d.socket)
        run_requests(c, 200)
        assert c.flush(30)
        seq = settle(c.stats)
        assert sub.wait_for(seq), (sub.last_seq, seq, sub.errors)
        want = blocks_ls(d.socket)
        assert {"CPU", "STORAGE"} <= set().union(*want.values())
        assert any(m == {"STORAGE"} for m in want.values())     # demoted blocks are known
        assert sub.snapshot()[1] == want
        assert seq >> EPOCH_SHIFT == 1
        c.close()

        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait(10)
        d = DaemonProc(d.data_dir, d.socket, cfg).start()
        c = RemoteClient.connect(d.socket)
        seq2 = settle(c.stats)
        assert seq2 >> EPOCH_SHIFT == 2                    # a new epoch: the gap shows
        assert sub.wait_for(seq2), (sub.last_seq, seq2, sub.errors)
        want2 = blocks_ls(d.socket)
        assert want2 and all(m == {"STORAGE"} for m in want2.values())
        assert sub.snapshot()[1] == want2
        assert sub.replays >= 2                            # the late start and the restart

        run_requests(c, 40)                                # more traffic in the new epoch
        assert c.flush(30)
        seq3 = settle(c.stats)
        late = Subscriber(f"tcp://127.0.0.1:{pub}", f"tcp://127.0.0.1:{rep}", catch_up=True)
        assert late.wait_for(seq3), (late.last_seq, seq3, late.errors)
        assert sub.wait_for(seq3)
        want3 = blocks_ls(d.socket)
        assert late.snapshot()[1] == want3 == sub.snapshot()[1]
        assert not sub.errors and not late.errors
        st = c.stats()["events"]
        assert st["snapshots"] >= 1 and st["errors"] == 0
        c.close()
    finally:
        for s in (sub, late):
            if s is not None:
                s.close()
        d.kill()
