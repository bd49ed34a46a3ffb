"""Device-side split-ring throughput: descriptors/s for pop_avail + walk + push_used on one core
(process CPU time of the device side).

The driver model (``rings.driver``) fills a 256-entry queue with TX chains and recycles them between
rounds; only the device side is timed. Prints a table, or JSON with ``--json``.

    python benchmarks/bench_rings.py [--json] [--seconds 1.0] [--queue-size 256]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from rings.driver import GuestDriver, TxLayout


def run_case(
    *, queue_size: int, batch: int, layout: TxLayout, seconds: float
) -> dict[str, float | int | str]:
    driver = GuestDriver()
    q = driver.add_queue(0, queue_size)
    dq = q.device_queue()
    mem = driver.memory
    # A chain of two descriptors (header, frame) takes two table slots: fewer chains fit.
    descs_per_chain = 1 if layout is TxLayout.ONE else 2  # segments walked per chain
    fill = queue_size // (2 if layout is TxLayout.TWO else 1)
    batch = min(batch, fill)
    for i in range(fill):
        q.post_tx(bytes([i & 0xFF]) * 64, layout=layout)
    chains = 0
    busy = 0.0
    rounds = 0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        # CPU time of this process, not wall time: on a shared 2-core machine the wall clock also
        # counts time spent waiting for a core.
        t0 = time.process_time()
        for _ in range(fill // batch):
            heads = dq.pop_avail(mem, batch)
            b = dq.walk(mem, heads)
            dq.push_used(mem, b.heads, b.readable_len)
            chains += heads.shape[0]
        busy += time.process_time() - t0
        rounds += 1
        q.recycle()  # the guest refills (not timed)
    return {
        "layout": layout.value,
        "batch": batch,
        "rounds": rounds,
        "chains": chains,
        "descriptors": chains * descs_per_chain,
        "seconds": busy,
        "chains_per_s": chains / busy,
        "descriptors_per_s": chains * descs_per_chain / busy,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("--seconds", type=float, default=1.0, help="device time per case (approx.)")
    ap.add_argument("--queue-size", type=int, default=256)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32, 256])
    ap.add_argument(
        "--layouts", nargs="+", default=["one", "two", "indirect"], choices=[x.value for x in TxLayout]
    )
    args = ap.parse_args(argv)
    np.seterr(all="raise")
    results = [
        run_case(queue_size=args.queue_size, batch=b, layout=TxLayout(lay), seconds=args.seconds)
        for lay in args.layouts
        for b in args.batches
    ]
    if args.json:
        print(json.dumps({"queue_size": args.queue_size, "results": results}, indent=2))
        return 0
    print(f"split ring, queue size {args.queue_size}: pop_avail + walk + push_used (device side only)")
    print(f"{'layout':>9} {'batch':>6} {'chains/s':>12} {'descs/s':>12} {'us/batch':>9}")
    for r in results:
        per_batch = float(r["seconds"]) / (int(r["chains"]) / int(r["batch"])) * 1e6
        print(
            f"{r['layout']:>9} {r['batch']:>6} {float(r['chains_per_s']):>12,.0f} "
            f"{float(r['descriptors_per_s']):>12,.0f} {per_batch:>9.1f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
