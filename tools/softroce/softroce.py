#!/usr/bin/env python3
"""Soft-RoCE guest for the RDMA transport: build (cached) and boot a qemu guest with rdma_rxe.

    python tools/softroce/softroce.py check            # can this host build/boot? (exit 0/3)
    python tools/softroce/softroce.py build            # build if not cached; prints its dir
    python tools/softroce/softroce.py run [--mode M]   # boot, run M in the guest, print its summary

Modes (guest/run.sh): ``test`` (default: the transfer contract suite on the real rxe0 device,
then the two-node block fetch, guest/two_node.py), ``bench`` (benchmarks/bench_rdma_guest.py),
``shell-smoke`` (device listing only).

Cache: ``$TIERSTORE_SOFTROCE_CACHE`` (default ``~/.cache/tierstore-softroce``)/``<key>/``, where
the key hashes build.sh, guest/init and the pins (kernel package, suite, mirror). A build runs
into ``<key>.tmp`` under an flock and is renamed when complete, so a killed build never looks
cached. Images of other keys are left alone (``prune`` deletes them).

Guest (see SOFTROCE.md in the shared docs): the Debian 6.1 kernel under qemu TCG (``/dev/kvm``
on our CI machines is PVM and boots no stock kernel), root filesystem over virtio-9p
read-only, the repository as a second read-only 9p share, a third writable share for results
and a fourth, ``<cache>/pycache``, for the guest's bytecode of the repository (compiling it
under TCG costs tens of seconds per boot; Python checks every .pyc against its source).
``-nic none``: the guest has no network device to the outside; rxe runs on a dummy netdev
inside it. Results: the guest writes ``summary.json`` into the results share and prints
``SOFTROCE-SUMMARY: N passed, N failed`` on its console; ``run`` prints the same line and exits
0 only when the guest ran and nothing failed (3: cannot run here, the reason on stderr).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PINS = {
    "KPKG": "linux-image-6.1.0-57-amd64",
    "KVER": "6.1.0-57-amd64",
    "SUITE": "bookworm",
    "DEBIAN_MIRROR": os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian"),
    "DEBIAN_SECURITY_MIRROR": os.environ.get("DEBIAN_SECURITY_MIRROR",
                                             "http://deb.debian.org/debian-security"),
}
BUILD_INPUTS = [HERE / "build.sh", HERE / "guest" / "init"]
EXIT_CANNOT_RUN = 3
QEMU = "qemu-system-x86_64"


def cache_root() -> Path:
    return Path(os.environ.get("TIERSTORE_SOFTROCE_CACHE",
                               Path.home() / ".cache" / "tierstore-softroce"))


def image_key() -> str:
    h = hashlib.sha256()
    for p in BUILD_INPUTS:
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    h.update(json.dumps(PINS, sort_keys=True).encode())
    return h.hexdigest()[:16]


def image_dir() -> Path:
    return cache_root() / image_key()


def is_cached() -> bool:
    d = image_dir()
    return (d / "manifest.txt").is_file() and (d / "initrd.cpio.gz").is_file()


def cannot_run() -> str | None:
    """Why this host cannot build or boot the guest (None: it can)."""
    if sys.platform != "linux":
        return "not Linux"
    if shutil.which(QEMU) is None:
        return f"{QEMU} not installed (apt-get install qemu-system-x86)"
    if not is_cached():
        for tool, pkg in (("debootstrap", "debootstrap"), ("busybox", "busybox-static"),
                          ("cpio", "cpio"), ("depmod", "kmod"), ("chroot", "coreutils")):
            if shutil.which(tool) is None and not Path("/bin", tool).exists():
                return f"{tool} not installed (apt-get install {pkg}), and no cached image"
        if os.geteuid() != 0:
            return "building the guest image needs root (debootstrap), and no cached image"
        bb = shutil.which("busybox") or "/bin/busybox"
        out = subprocess.run(["file", "-L", bb], capture_output=True, text=True).stdout \
            if shutil.which("file") else "statically"
        if "statically" not in out and "static-pie" not in out:
            return "busybox is not the static build (apt-get install busybox-static)"
    return None


def build(log=sys.stderr) -> Path:
    """The image directory, built now if not cached. Raises RuntimeError on a failed build."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    final = image_dir()
    with open(root / ".lock", "w") as lk:
        fcntl.flock(lk, fcntl.LOCK_EX)
        if is_cached():
            return final
        tmp = final.with_name(final.name + ".tmp")
        if tmp.exists():
            subprocess.run(["umount", "-l", str(tmp / "rootfs" / "proc")], capture_output=True)
            subprocess.run(["umount", "-l", str(tmp / "rootfs" / "dev")], capture_output=True)
            shutil.rmtree(tmp)
        t0 = time.monotonic()
        env = dict(os.environ, **PINS)
        r = subprocess.run(["bash", str(HERE / "build.sh"), str(tmp)], env=env, stdout=log,
                           stderr=log)
        if r.returncode != 0:
            raise RuntimeError(f"image build failed (rc {r.returncode}); partial build in {tmp}")
        (tmp / "build_seconds.txt").write_text(f"{time.monotonic() - t0:.1f}\n")
        tmp.rename(final)
        return final


def qemu_argv(img: Path, out: Path, mode: str, mem_mb: int, smp: int) -> list[str]:
    share = "security_model=none,readonly=on"
    pycache = cache_root() / "pycache"   # the guest's bytecode for /src, kept between runs
    pycache.mkdir(parents=True, exist_ok=True)
    return [
        QEMU, "-accel", "tcg,thread=multi", "-cpu", "max", "-m", str(mem_mb),
        "-smp", str(smp), "-nographic", "-no-reboot", "-nic", "none",
        "-kernel", str(img / "vmlinuz"), "-initrd", str(img / "initrd.cpio.gz"),
        "-fsdev", f"local,id=r,path={img / 'rootfs'},security_model=passthrough,readonly=on",
        "-device", "virtio-9p-pci,fsdev=r,mount_tag=rootfs",
        "-fsdev", f"local,id=s,path={REPO},{share}",
        "-device", "virtio-9p-pci,fsdev=s,mount_tag=src",
        "-fsdev", f"local,id=o,path={out},security_model=none",
        "-device", "virtio-9p-pci,fsdev=o,mount_tag=out",
        "-fsdev", f"local,id=c,path={pycache},security_model=none",
        "-device", "virtio-9p-pci,fsdev=c,mount_tag=pycache",
        "-append", f"console=ttyS0 panic=-1 loglevel=4 tsmode={mode}",
    ]


def run(mode: str = "test", timeout_s: float = 900.0, mem_mb: int = 2048, smp: int | None = None,
        echo: bool = True) -> dict:
    """Boot the guest in ``mode``; returns the guest's summary (plus ``wall_s``, ``log``).
    Raises RuntimeError when the guest gave no summary (crash, timeout)."""
    img = build()
    smp = smp or min(os.cpu_count() or 1, 4)
    with tempfile.TemporaryDirectory(prefix="softroce-out-") as td:
        out = Path(td)
        os.chmod(out, 0o777)
        t0 = time.monotonic()
        log_lines: list[str] = []
        p = subprocess.Popen(qemu_argv(img, out, mode, mem_mb, smp), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                             errors="replace")
        try:
            import threading
            def pump():
                for line in p.stdout:
                    log_lines.append(line)
                    if echo:
                        sys.stdout.write(line)
                        sys.stdout.flush()
            th = threading.Thread(target=pump, daemon=True)
            th.start()
            p.wait(timeout=timeout_s)
            th.join(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            raise RuntimeError(f"guest did not finish within {timeout_s:.0f} s") from None
        wall = time.monotonic() - t0
        f = out / "summary.json"
        if not f.is_file():
            tail = "".join(log_lines[-40:])
            raise RuntimeError(f"guest wrote no summary (qemu rc {p.returncode}); console "
                               f"tail:\n{tail}")
        summary = json.loads(f.read_text())
        summary["wall_s"] = round(wall, 1)
        summary["log"] = "".join(log_lines)
        for extra in out.iterdir():
            if extra.name != "summary.json" and extra.is_file():
                summary.setdefault("files", {})[extra.name] = extra.read_text(errors="replace")
        return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("check")
    sub.add_parser("build")
    sub.add_parser("key")
    sub.add_parser("prune")
    r = sub.add_parser("run")
    r.add_argument("--mode", default="test")
    r.add_argument("--timeout-s", type=float, default=900.0)
    r.add_argument("--quiet", action="store_true", help="do not echo the guest console")
    a = ap.parse_args(argv)
    if a.cmd == "key":
        print(image_dir())
        return 0
    if a.cmd == "prune":
        keep = image_key()
        for d in cache_root().glob("*"):
            if d.is_dir() and d.name != keep:
                shutil.rmtree(d)
                print(f"removed {d}", file=sys.stderr)
        return 0
    why = cannot_run()
    if why:
        print(f"softroce: cannot run here: {why}", file=sys.stderr)
        return EXIT_CANNOT_RUN
    if a.cmd == "check":
        print(f"softroce: ok (image {'cached' if is_cached() else 'not built yet'}: "
              f"{image_dir()})")
        return 0
    if a.cmd == "build":
        t0 = time.monotonic()
        d = build()
        print(d)
        print(f"softroce: image ready in {time.monotonic() - t0:.1f} s", file=sys.stderr)
        return 0
    try:
        s = run(a.mode, a.timeout_s, echo=not a.quiet)
    except RuntimeError as e:
        print(f"softroce: {e}", file=sys.stderr)
        return 1
    print(f"SOFTROCE-SUMMARY: {s['passed']} passed, {s['failed']} failed "
          f"(mode {a.mode}, guest wall {s['wall_s']} s)")
    return 0 if s["failed"] == 0 and s["passed"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
