"""How long N delayed tasks take end to end on the real processes.

Starts its own server (embedded binary), then `sumbatch api`, W `sumbatch worker`
processes and `sumbatch projector`; POSTs one group over HTTP, polls it every 50 ms
until processed, checks every sum, and prints the figures as JSON.

    python ops/bench/delayed.py --tasks 200 --delay 3-10 --workers 1
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

import httpx2 as httpx
from common import free_port, peak_rss_kib

from sumbatch.embedded import EmbeddedServer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--delay", default="3-10")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as data:
        server = EmbeddedServer(data, free_port())
        server.start()
        api_port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("SUMBATCH_")}
        env.update(REDIS_URL=server.url, SUMBATCH_DELAY=args.delay, SUMBATCH_LOG_LEVEL="WARNING")
        me = [sys.executable, "-m", "sumbatch"]
        api = subprocess.Popen([*me, "api", "--port", str(api_port)], env=env)
        workers = [subprocess.Popen([*me, "worker"], env=env) for _ in range(args.workers)]
        projector = subprocess.Popen([*me, "projector"], env=env)
        children = [api, *workers, projector]
        base = f"http://127.0.0.1:{api_port}"
        try:
            with httpx.Client(base_url=base, timeout=10) as client:
                deadline = time.monotonic() + 30
                while True:
                    try:
                        if client.get("/readyz").status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    if time.monotonic() > deadline:
                        raise SystemExit("API did not come up")
                    time.sleep(0.05)
                rand = random.randrange
                pairs = [(rand(10**6), rand(10**6)) for _ in range(args.tasks)]
                body = {"tasks": [{"paramA": a, "paramB": b} for a, b in pairs]}
                start = time.perf_counter()
                gid = client.post("/grouptasks", json=body).json()["groupTaskId"]
                posted = time.perf_counter() - start
                while True:
                    group = client.get(f"/grouptasks/{gid}").json()
                    if group["grouptaskProcessed"]:
                        break
                    time.sleep(0.05)
                elapsed = time.perf_counter() - start
            expected = [a + b for a, b in pairs]
            worker_rss = [peak_rss_kib(w.pid) for w in workers]
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
        finally:
            for child in children:
                child.send_signal(signal.SIGTERM)
            for child in children:
                child.wait(30)
            server.stop()


if __name__ == "__main__":
    main()
