"""How long N delayed tasks take end to end on the real processes.

Starts its own server (embedded binary), then `sumbatch api`, W `sumbatch worker`
processes and `sumbatch projector`; POSTs one group over HTTP, polls it every 50 ms
until processed, checks every sum, and prints the figures as JSON (a figure not
measured is null).

    python ops/bench/delayed.py --tasks 200 --delay 3-10 --workers 1
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import httpx2 as httpx
from common import peak_rss_kib, service, tasks_for

from sumbatch.processes.embedded import EmbeddedServer
from sumbatch.testing.ports import free_port

POLL = 0.05  # how often the client asks, as a client would


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--delay", default="3-10")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as data:
        server = EmbeddedServer(data, free_port())
        server.start()
        try:
            with (
                service(server.url, "delayed", args.delay, args.workers) as (base, children),
                httpx.Client(base_url=base, timeout=10) as client,
            ):
                body, expected = tasks_for(args.tasks)
                start = time.perf_counter()
                gid = client.post("/grouptasks", json=body).json()["groupTaskId"]
                posted = time.perf_counter() - start
                while True:
                    group = client.get(f"/grouptasks/{gid}").json()
                    if group["grouptaskProcessed"]:
                        break
                    time.sleep(POLL)
                elapsed = time.perf_counter() - start
                # service() starts the API, then the workers, then the projector.
                workers = children[1 : 1 + args.workers]
                worker_rss = [peak_rss_kib(w.pid) for w in workers]
        finally:
            server.stop()
    print(
        json.dumps(
            {
                "tasks": args.tasks,
                "delay": args.delay,
                "workers": args.workers,
                "post_s": round(posted, 4),
                "processed_s": round(elapsed, 3),
                "results_correct": group["results"] == expected,
                "worker_peak_rss_kib": worker_rss,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
