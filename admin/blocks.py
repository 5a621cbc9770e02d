"""``tierstore blocks ls|show|evict|pin|unpin``: the resident blocks of a store.

Keys are given as hex: the full 64 digits, or a unique prefix of at least 8. ``evict`` is
destructive: ``--dry-run`` reports what it would do; without ``--yes`` it asks on a terminal and
refuses (exit 2) otherwise. ``evict --tier dram`` drops only the DRAM copies of blocks that NVMe
holds (NVMe untouched): how an operator frees DRAM, or a benchmark starts cold; ``tierstore
flush`` first makes sure every block has its NVMe copy. A block ``--tier`` holds the only copy
of is kept (``only_copy``). The dry run's ``--json`` lists each key's outcome, at most ``--limit``
of them (default 100, 0 = all, as ``blocks ls``; ``truncated`` says when some were left off).

``pin`` / ``unpin`` go through the daemon only (``--socket``): the pins belong to a named
session (owner ``session:<NAME>``, default session ``default``), not to this short-lived
connection, so they outlive the command; ``--ttl`` is required, so a forgotten pin still goes.

Store calls, whatever the number of keys: one ``resolve`` when any key is a prefix (none when
all are whole), then one call for the verb (``block``, ``evict``, ``evict(dry_run=True)``,
``pin``, ``unpin_each``); ``evict --all`` lists the blocks first (``blocks``). With ``--tier``,
``ls`` and ``evict`` first make one ``usage`` call (the tier must exist; its block count is
there too). ``ls`` makes one ``blocks`` call, plus one ``stats`` when ``--limit`` cut a list of
every tier (the total: the store's own count, not a listing).

Exit codes (tierstore_admin.output): 1 when any named block was not done: ``show`` of a block
that is not there, ``evict`` of a block that is missing, pinned, not in ``--tier`` or only
there, ``pin`` of a block not resident, ``unpin`` of a block the session did not pin.
"""

from __future__ import annotations

import sys
from typing import List, Optional

import typer

from tierstore.errors import KeyPrefixError, PinError
from tierstore.types import Tier
from tierstore.units import parse_duration
from tierstore_admin.datadir import data_dir_option, open_client, socket_option
from tierstore_admin.output import (EXIT_FAILED, EXIT_OK, JSON_HELP, emit, fail, kv_table,
                                    table, user_errors)

app = typer.Typer(help="Blocks of a store: list, show, evict, pin, unpin.", no_args_is_help=True)

MIN_PREFIX = 8
DEFAULT_LIMIT = 100   # longest key list a command prints unless --limit says otherwise (0 = all)
DEFAULT_SESSION = "default"


def _tier(text: Optional[str]) -> Optional[Tier]:
    if text is None:
        return None
    try:
        return Tier.parse(text)
    except ValueError as e:
        fail(str(e))


def _resolve(client, texts: List[str]) -> list[bytes]:
    """Hex keys or unique prefixes -> keys, with one store call (``resolve``) for all the
    prefixes, none when every key is whole. A bad or ambiguous key is a usage error (the first
    one in the order given, as when the keys were resolved one by one); a prefix that matches
    nothing is kept out (reported as missing by the caller)."""
    out: list = []            # a whole key, or the index of a prefix in ``prefixes``
    prefixes: list[str] = []
    problem = None
    for t in texts:
        t = t.strip().lower()
        try:
            raw = bytes.fromhex(t) if len(t) % 2 == 0 else None
        except ValueError:
            raw = None
        if raw is None and not all(c in "0123456789abcdef" for c in t):
            problem = f"not a hex key: {t!r}"
            break
        if len(t) == 64:
            out.append(raw)
            continue
        if len(t) < MIN_PREFIX:
            problem = f"key prefix {t!r} too short (give at least {MIN_PREFIX} hex digits)"
            break
        out.append(len(prefixes))
        prefixes.append(t)
    found = _resolve_prefixes(client, prefixes) if prefixes else []   # an earlier ambiguity first
    if problem is not None:
        fail(problem)
    return [k if isinstance(k, bytes) else found[k] or bytes.fromhex(prefixes[k].ljust(64, "0"))
            for k in out]


def _resolve_prefixes(client, prefixes: List[str]) -> list[Optional[bytes]]:
    """``client.resolve`` of the prefixes that are pure hex digits (one call); None for the rest
    (``bytes.fromhex`` lets blanks through: such a prefix never matched a key)."""
    hexes = [p for p in prefixes if all(c in "0123456789abcdef" for c in p)]
    try:
        keys = iter(client.resolve(hexes, unknown_ok=True) if hexes else [])
    except KeyPrefixError as e:   # ambiguous: "key prefix '…' is ambiguous (N blocks)"
        fail(str(e))
    return [next(keys) if all(c in "0123456789abcdef" for c in p) else None for p in prefixes]


def _require_tier(client, t) -> Optional[list]:
    """The store's ``usage()`` when ``t`` (a tier or None) is given; exit 1 with one line when
    the store has no such tier (ls and evict alike: "0 blocks" would read as an empty tier)."""
    if t is None:
        return None
    usage = client.usage()
    if t.label not in {u["tier"] for u in usage}:
        fail(f"this store has no {t.label} tier: no block can be in it", EXIT_FAILED)
    return usage


@app.command("ls")
def ls(data_dir: Optional[str] = data_dir_option(),
          socket: Optional[str] = socket_option(),
       tier: Optional[str] = typer.Option(None, "--tier", help="Only blocks resident in this tier."),
       limit: int = typer.Option(DEFAULT_LIMIT, "--limit", min=0, help="At most this many (0 = all)."),
       as_json: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """List resident blocks (the title and --json's "total" say how many there are in all)."""
    t = _tier(tier)
    with open_client(data_dir, socket) as client, user_errors():
        usage = _require_tier(client, t)
        blocks = client.blocks(limit=(limit + 1) if limit else None, tier=t)
        truncated = bool(limit) and len(blocks) > limit
        total = len(blocks)
        if truncated:   # the store counts its blocks (per tier too): no scan, one call at most
            total = _count(client, t, usage)
    # a block stored between the two calls can make the count run behind the listing
    total = max(total, len(blocks))
    blocks = blocks[:limit] if limit else blocks
    emit({"store": socket or data_dir, "count": len(blocks), "total": total,
          "truncated": truncated, "limit": limit, "tier": t.label if t is not None else None,
          "blocks": blocks}, as_json=as_json, human=_human_ls)


def _count(client, t: Optional[Tier], usage: Optional[list]) -> int:
    """Resident blocks in all (``stats()["blocks"]``), or in tier ``t`` (its ``usage`` entry's
    ``blocks``): counts the store keeps, not a listing."""
    if t is None:
        return int(client.stats()["blocks"])
    return int(next(u["blocks"] for u in usage if u["tier"] == t.label))


@app.command("show")
def show(key: str = typer.Argument(..., help="Block key (hex, or a unique prefix)."),
         data_dir: Optional[str] = data_dir_option(),
          socket: Optional[str] = socket_option(),
         as_json: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """Show one block: namespace, tiers, slots, size, checksum, pins."""
    with open_client(data_dir, socket) as client, user_errors():
        (k,) = _resolve(client, [key])
        info = client.block(k)
    if info is None:
        fail(f"no block {key}", EXIT_FAILED)
    emit(info, as_json=as_json, human=_human_show)


@app.command("evict")
def evict(keys: List[str] = typer.Argument(None, help="Block keys (hex, or unique prefixes)."),
          all_: bool = typer.Option(False, "--all", help="Every block (of --tier, if given)."),
          tier: Optional[str] = typer.Option(
              None, "--tier", help="Drop only this tier's copies, of blocks another tier holds "
                                   "too (dram: the DRAM copies of blocks on NVMe). Default: the "
                                   "whole block, from every tier."),
          dry_run: bool = typer.Option(False, "--dry-run", help="Say what would be evicted; change nothing."),
          limit: Optional[int] = typer.Option(
              None, "--limit", min=0,
              help=f"With --dry-run: list at most this many keys in the JSON's \"keys\" (0 = all; "
                   f"default {DEFAULT_LIMIT}, as blocks ls); the counts cover every block. It does "
                   f"not limit what is evicted."),
          yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
          data_dir: Optional[str] = data_dir_option(),
          socket: Optional[str] = socket_option(),
          as_json: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """Remove unpinned blocks, from every tier or from --tier only (destructive)."""
    if bool(keys) == all_:
        fail("give block keys or --all (not both)")
    if limit is not None and not dry_run:
        fail("--limit caps the key list of --dry-run; it does not limit what evict removes "
             "(name the keys to evict only some)")
    limit = DEFAULT_LIMIT if limit is None else limit
    t = _tier(tier)
    with open_client(data_dir, socket) as client, user_errors():
        _require_tier(client, t)
        targets = [bytes.fromhex(b["key"]) for b in client.blocks(tier=t)] if all_ \
            else _resolve(client, keys)
        if dry_run:
            result = {"dry_run": True, "tier": tier, "would_evict": 0, "pinned": 0, "missing": 0,
                      "not_in_tier": 0, "only_copy": 0, "keys": []}
            outcomes = client.evict(targets, tier=t, dry_run=True)["outcomes"]
            for k, outcome in zip(targets, outcomes):
                state = "would_evict" if outcome == "evicted" else outcome
                result[state] += 1
                if not limit or len(result["keys"]) < limit:
                    result["keys"].append({"key": k.hex(), "state": state})
            result["truncated"] = len(result["keys"]) < len(targets)
        else:
            if not yes:
                if not sys.stdin.isatty():
                    fail(f"refusing to evict {len(targets)} block(s) without --yes (or use --dry-run)")
                where = f" from {t.label}" if t is not None else ""
                if not typer.confirm(f"evict {len(targets)} block(s){where} of {socket or data_dir}?",
                                     err=True):
                    fail("not confirmed: nothing evicted", EXIT_FAILED)
            counts = client.evict(targets, tier=t) if t is not None else client.evict(targets)
            result = {"dry_run": False, "tier": tier, "evicted": counts.get("evicted", 0),
                      "pinned": counts.get("pinned", 0), "missing": counts.get("missing", 0),
                      "not_in_tier": counts.get("not_in_tier", 0),
                      "only_copy": counts.get("only_copy", 0)}
    left = sum(result[k] for k in ("pinned", "missing", "not_in_tier", "only_copy"))
    emit(result, as_json=as_json, human=_human_evict, code=EXIT_FAILED if left else EXIT_OK)


def _session_option() -> str:
    return typer.Option(DEFAULT_SESSION, "--session",
                        help="Session owning the pins (owner session:<NAME>); they outlive this "
                             "command and go by TTL or unpin.")


def _daemon_only(socket: Optional[str], verb: str, data_dir: Optional[str] = None) -> None:
    if not socket:
        why = (" (in-process, with --data-dir, the pins would end with this command)"
               if data_dir else "")
        fail(f"{verb} goes through the daemon: pass --socket (or set $TIERSTORE_SOCKET); the pins "
             f"belong to a session of the daemon and outlive this command{why}")


def _no_data_dir() -> Optional[str]:
    """A hidden --data-dir on pin/unpin: not offered in --help (it can never work), but given
    anyway it gets the explanation instead of 'no such option'."""
    return typer.Option(None, "--data-dir", hidden=True)


@app.command("pin")
def pin(keys: List[str] = typer.Argument(..., help="Block keys (hex, or unique prefixes)."),
        ttl: str = typer.Option(..., "--ttl", help="How long the pins hold: 30s, 30m, 2h, 1d (required)."),
        session: str = _session_option(),
        socket: Optional[str] = socket_option(),
        data_dir: Optional[str] = _no_data_dir(),
        as_json: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """Pin blocks for a session until --ttl passes or they are unpinned (daemon only)."""
    _daemon_only(socket, "pinning", data_dir)
    with user_errors():
        ttl_s = parse_duration(ttl)
    with open_client(None, socket) as client, user_errors():
        targets = _resolve(client, keys)
        n = client.pin(targets, ttl_s=ttl_s, session=session)
    result = {"session": session, "ttl_s": ttl_s, "requested": len(targets), "pinned": n,
              "not_resident": len(targets) - n}
    emit(result, as_json=as_json, human=_human_pin, code=EXIT_OK if n == len(targets) else EXIT_FAILED)


@app.command("unpin")
def unpin(keys: List[str] = typer.Argument(..., help="Block keys (hex, or unique prefixes)."),
          session: str = _session_option(),
          socket: Optional[str] = socket_option(),
          data_dir: Optional[str] = _no_data_dir(),
          as_json: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """Release one pin of the session on each block (daemon only)."""
    _daemon_only(socket, "unpinning", data_dir)
    with open_client(None, socket) as client, user_errors():
        targets = _resolve(client, keys)
        try:
            done = client.unpin_each(targets, session=session)
        except PinError:   # a bad session name: as before, no key held a pin of it
            done = [False] * len(targets)
    out = [{"key": k.hex(), "state": "unpinned" if ok else "not_pinned"}
           for k, ok in zip(targets, done)]
    bad = sum(1 for x in out if x["state"] != "unpinned")
    emit({"session": session, "unpinned": len(out) - bad, "not_pinned": bad, "keys": out},
         as_json=as_json, human=_human_unpin, code=EXIT_FAILED if bad else EXIT_OK)


def _human_pin(console, r: dict) -> None:
    console.print(f"session {r['session']}: pinned {r['pinned']} of {r['requested']} block(s) "
                  f"for {r['ttl_s']:g} s" + (f", {r['not_resident']} not resident" if r["not_resident"] else ""))


def _human_unpin(console, r: dict) -> None:
    console.print(f"session {r['session']}: unpinned {r['unpinned']}"
                  + (f", {r['not_pinned']} held no pin of this session" if r["not_pinned"] else ""))


def _human_ls(console, r: dict) -> None:
    where = f" in {r['tier']}" if r.get("tier") else ""
    title = (f"{r['count']} of {r['total']} block(s){where} shown (--limit {r['limit']}; "
             f"--limit 0: all)" if r["truncated"] else f"{r['count']} block(s){where}")
    console.print(table(title,
                        ["key", "model", "tiers", "size", "checksum", "pins"],
                        [(b["key"][:16], b["namespace"].get("model", "?"), b["tiers"],
                          b["size_bytes"], b["checksum"], b["pins"]) for b in r["blocks"]]))


def _human_show(console, b: dict) -> None:
    console.print(kv_table(f"block {b['key'][:16]}", [
        ("key", b["key"]), ("tiers", b["tiers"]), ("slots", b["slots"]),
        ("size_bytes", b["size_bytes"]), ("checksum", b["checksum"]), ("pins", b["pins"]),
        ("pin owners", "; ".join(
            f"{o['owner']} x{o['pins']}" + ("" if o["expires_in_s"] is None
                                            else f" (expires in {o['expires_in_s']:.0f} s)")
            for o in b.get("pin_owners", [])) or None),
        ("namespace", b["namespace"])]))


def _evict_rest(r: dict) -> str:
    """The blocks left alone, in words: ``; not evicted: 2 pinned, 1 missing, 3 not in dram;
    5 block(s) kept: dram holds their only copy (no other tier has them)``."""
    tier = r.get("tier") or "that tier"
    plain = ", ".join(f"{r[k]} {what}" for k, what in (
        ("pinned", "pinned"), ("missing", "missing"), ("not_in_tier", f"not in {tier}"))
        if r[k])
    out = (f"; {'would not evict' if r['dry_run'] else 'not evicted'}: {plain}") if plain else ""
    if r["only_copy"]:
        out += (f"; {r['only_copy']} block(s) kept: {tier} holds their only copy "
                f"(no other tier has them)")
    return out


def _human_evict(console, r: dict) -> None:
    where = f" from {r['tier']}" if r.get("tier") else ""
    if r["dry_run"]:
        console.print(f"dry run: would evict {r['would_evict']}{where}{_evict_rest(r)}")
    else:
        console.print(f"evicted {r['evicted']}{where}{_evict_rest(r)}")
