"""Operator scale: N StableDiffusionServices against the API emulator (kmock) on loopback.

    python bench/operator_scale.py --count 1000

Measures the time until every service is reconciled (status.observedGeneration written),
the write calls during a window in which every service gets a no-op timer resync
(target 0), and the operator process's peak RSS. The operator runs as `sdop operator`, in
its own process, exactly as in the integration tests.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys
import tempfile
import threading
import time

import httpx
import psutil

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Run from anywhere: the bench's own helpers and the shared ones in testing/.
sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "testing")]
from common import table, write  # noqa: E402 - needs the path set above

from sdtesting.apiserver import Cluster  # noqa: E402 - needs the path set above
from sdtesting.examples import example  # noqa: E402 - needs the path set above
from sdtesting.procs import OperatorProc  # noqa: E402 - needs the path set above


class RssSampler(threading.Thread):
    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.peak = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.2)


def reconciled(cluster: Cluster) -> int:
    return sum(
        1
        for o in cluster.objects_of("stablediffusionservices")
        if (o.get("status") or {}).get("observedGeneration") == 1
    )


def resync_count(metrics_url: str) -> float:
    text = httpx.get(metrics_url, timeout=10).text
    m = re.search(r'sdop_reconciles_total\{result="ok",trigger="resync"\} ([0-9.e+]+)', text)
    return float(m.group(1)) if m else 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--namespaces", type=int, default=10)
    ap.add_argument("--resync-seconds", type=float, default=60)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument(
        "--quiet-seconds", type=float, default=15, help="settled: this long without a write to the API server"
    )
    args = ap.parse_args()

    cluster = Cluster()
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="sdop-scale-"))
    op = OperatorProc(
        cluster.kubeconfig(tmp / "kubeconfig"),
        tmp,
        verbose=False,
        resync_seconds=args.resync_seconds,
        log_level="warning",
    )
    rss = RssSampler(op.proc.pid)
    rss.start()
    metrics_url = op.metrics_url
    try:
        time.sleep(3)
        base = example("sd15-production")
        t0 = time.perf_counter()
        for i in range(args.count):
            cr = {**base, "metadata": {"name": f"sd-{i:04d}", "namespace": f"team-{i % args.namespaces}"}}
            cluster.create(cr)
        created_s = time.perf_counter() - t0
        deadline = time.time() + args.timeout
        done = 0
        while time.time() < deadline:
            done = reconciled(cluster)
            if done >= args.count:
                break
            time.sleep(1)
        all_reconciled_s = time.perf_counter() - t0
        children = sum(
            1
            for (res, _, _) in list(cluster.api.objects)
            if res.rsplit("/", 1)[-1] not in ("stablediffusionservices", "events")
        )
        print(f"{done}/{args.count} reconciled in {all_reconciled_s:.1f}s ({children} children)", flush=True)

        # Settle: the last services' follow-up events (Deployment created, status written) drain
        # until the API server has had no write for --quiet-seconds.
        settle_deadline = time.time() + args.timeout
        while time.time() < settle_deadline:
            mark = len(cluster.api.writes)
            time.sleep(args.quiet_seconds)
            if len(cluster.api.writes) == mark:
                break
        settled_s = time.perf_counter() - t0
        # No-op resync: every service's timer fires at least once in the window; nothing changed.
        mark, resyncs0 = len(cluster.api.writes), resync_count(metrics_url)
        time.sleep(args.resync_seconds * 1.5)
        writes = cluster.writes_since(mark)
        resyncs = resync_count(metrics_url) - resyncs0
    finally:
        rss.stop.set()
        op.stop()
        cluster.close()

    row = {
        "services": args.count,
        "children": children,
        "reconciled": done,
        "create calls s": created_s,
        "all reconciled s": all_reconciled_s,
        "settled s": settled_s,
        "services/s": done / all_reconciled_s,
        "resyncs in window": resyncs,
        "writes in no-op resync": len(writes),
        "operator peak RSS MiB": rss.peak / 2**20,
    }
    print(table([row], list(row)))
    path = write(
        "operator_scale",
        {
            "settings": vars(args),
            **row,
            "writes_sample": writes[:20],
            "targets": {"writes_in_noop_resync": 0},
            "met": {"noop_writes": len(writes) == 0},
        },
    )
    print(f"wrote {path}")
    return 0 if done >= args.count else 1


if __name__ == "__main__":
    sys.exit(main())
