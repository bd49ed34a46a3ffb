#!/usr/bin/env python3
"""Record the vhost-user messages a real QEMU sends nicsim while a test guest boots, pings and shuts down.

A small proxy sits between QEMU and an in-process nicsim ``Server`` (the default responder device): it
reads each whole message (12-byte header, then the payload) with the fds that came with it, forwards
both to the other side, and writes one record per message into a JSON file. The records in the
direction frontend -> backend are exactly what nicsim received; the replies are kept too, for reading.
The guest is the test image (``images.build.build_image()``), under TCG, running ``ping`` to the
responder a few times; then QEMU is told to quit over QMP.

The file (``tests/data/qemu72_net_boot.json`` is one) holds::

    {"description": ..., "qemu": "<qemu -version, first line>", "guest_memory_mb": 256,
     "messages": [{"dir": "to_backend" | "to_frontend", "data": "<header+payload, hex>", "fds": N}, ...]}

``fds`` is the number of file descriptors that came with the message; the fds themselves are not
recorded (a replay hands in stand-ins: memfds for memory regions, eventfds for rings).

Usage: ``python scripts/record_vhost.py OUT.json [--pings N]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from images.build import build_image  # noqa: E402
from nicsim.ports import ResponderPort  # noqa: E402
from nicsim.server import Server  # noqa: E402
from nicsim.virtio.device import VirtioNetDevice  # noqa: E402
from qemu.testvm import TestVM, VhostUserNic, Workload  # noqa: E402
from qemu.testvm.cmdline import DEFAULT_QEMU  # noqa: E402

HEADER = struct.Struct("<III")  # request, flags, size (vhost-user spec, "Message Specification")
MAX_FDS = 16
BOOT_TIMEOUT = 180.0


def _recv_exact(sock: socket.socket, n: int, fds: list[int]) -> bytes | None:
    """``n`` bytes from ``sock`` (fds that come with them are appended to ``fds``); None at EOF."""
    buf = b""
    while len(buf) < n:
        data, got, _, _ = socket.recv_fds(sock, n - len(buf), MAX_FDS)
        fds.extend(got)
        if not data:
            return None
        buf += data
    return buf


def _forward(src: socket.socket, dst: socket.socket, direction: str, out: list[dict[str, Any]],
             lock: threading.Lock) -> None:  # fmt: skip
    """Forward whole messages from ``src`` to ``dst`` until either side closes, recording each."""
    try:
        while True:
            fds: list[int] = []
            head = _recv_exact(src, HEADER.size, fds)
            body = _recv_exact(src, HEADER.unpack(head)[2], fds) if head is not None else None
            if head is None or body is None:
                return
            with lock:
                out.append({"dir": direction, "data": (head + body).hex(), "fds": len(fds)})
            try:
                socket.send_fds(dst, [head + body], fds) if fds else dst.sendall(head + body)
            finally:
                for fd in fds:
                    os.close(fd)
    except OSError:
        return
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_RDWR)


def _proxy(listener: socket.socket, backend_path: Path, out: list[dict[str, Any]]) -> None:
    """Accept QEMU's one connection, connect to the backend, forward both ways until both end."""
    front, _ = listener.accept()
    back = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    back.connect(str(backend_path))
    lock = threading.Lock()
    t = threading.Thread(target=_forward, args=(back, front, "to_frontend", out, lock), daemon=True)
    t.start()
    _forward(front, back, "to_backend", out, lock)
    t.join(30)
    front.close()
    back.close()


async def record(out_path: Path, pings: int) -> int:
    image = build_image()
    messages: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="nicsim-record-") as tmp:
        backend_path, proxy_path = Path(tmp) / "nicsim.sock", Path(tmp) / "qemu.sock"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(proxy_path))
        listener.listen(1)
        async with Server([backend_path], lambda: VirtioNetDevice(port=ResponderPort())) as server:
            proxy = threading.Thread(target=_proxy, args=(listener, backend_path, messages), daemon=True)
            proxy.start()
            vm = TestVM(kernel=image.kernel, initrd=image.initrd, nic=VhostUserNic(socket=proxy_path),
                        accel="tcg", workloads=[Workload("ping", target="10.0.2.2", count=pings,
                                                         interval=0.2)])  # fmt: skip
            async with vm:
                (result,) = await vm.results(BOOT_TIMEOUT)
            await asyncio.to_thread(proxy.join, 30)
            await asyncio.wait_for(server.endpoints[0].wait_idle(), 30)
        listener.close()
    if not result.ok:
        print(f"the guest's ping failed: {result}", file=sys.stderr)
        return 1
    version = subprocess.run([DEFAULT_QEMU, "-version"], capture_output=True, text=True, check=True)
    doc = {
        "description": "vhost-user messages QEMU sent nicsim (to_backend) and nicsim's replies "
                       f"(to_frontend) while a test guest booted, pinged the responder {pings} times "
                       "and QEMU quit; recorded by scripts/record_vhost.py",
        "qemu": version.stdout.splitlines()[0],
        "guest_memory_mb": 256,
        "messages": messages,
    }  # fmt: skip
    out_path.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"{len(messages)} messages written to {out_path}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="the JSON file to write")
    ap.add_argument("--pings", type=int, default=3, help="pings the guest sends (default 3)")
    args = ap.parse_args()
    return asyncio.run(record(args.out, args.pings))


if __name__ == "__main__":
    sys.exit(main())
