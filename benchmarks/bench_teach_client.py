"""Benchmark: teacher requests through ChatClient, bounded concurrency vs one at a time, and a cached rerun.

    python benchmarks/bench_teach_client.py                  # 48 requests, concurrency 8 (the recorded run)
    python benchmarks/bench_teach_client.py --requests 16

A teacher's latency, not the CPU, bounds a labelling run, so the client keeps ``concurrency`` requests
in flight. The server is the tests' fault server on 127.0.0.1 answering every request after a fixed
0.3 s (its ``slow`` kind: a stand-in for a remote teacher's latency). Same process, same requests:

* reference: ``concurrency=1`` (a plain loop over the requests);
* ours: ``concurrency=N`` (``ChatClient.complete_many``);
* rerun: the same requests again with the request cache filled by the first run: no request is sent.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import load_average  # noqa: E402
from mlmfilter.clients import ChatClient, ChatRequest, ClientOptions, RequestCache  # noqa: E402
from tests.support.fault_server import FaultServer  # noqa: E402


def _requests(n: int, tag: str) -> list[ChatRequest]:
    return [
        ChatRequest(
            {
                "model": "teacher",
                "messages": [{"role": "user", "content": f"{tag} pair {i} [fault:slow]"}],
                "max_tokens": 64,
            }
        )
        for i in range(n)
    ]


def _run(client: ChatClient, requests: list[ChatRequest]) -> float:
    start = time.perf_counter()
    results = list(client.complete_many(requests))
    elapsed = time.perf_counter() - start
    assert len(results) == len(requests) and all(r.ok for r in results)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    with FaultServer() as server, tempfile.TemporaryDirectory() as tmp:
        serial = ChatClient(ClientOptions(base_url=server.base_url, concurrency=1))
        reference = _run(serial, _requests(args.requests, "serial"))
        cache = RequestCache(Path(tmp) / "requests.sqlite")
        ours_client = ChatClient(ClientOptions(base_url=server.base_url, concurrency=args.concurrency), cache=cache)
        ours = _run(ours_client, _requests(args.requests, "pool"))
        sent = server.requests
        rerun_client = ChatClient(ClientOptions(base_url=server.base_url, concurrency=args.concurrency), cache=cache)
        rerun = _run(rerun_client, _requests(args.requests, "pool"))
        assert server.requests == sent and rerun_client.stats.cache_hits == args.requests
        print(f"{args.requests} requests, 0.3 s server latency, load average {load_average()}")
        print(f"reference (concurrency 1): {reference:.2f} s")
        print(f"ours (concurrency {args.concurrency}, max in flight {server.max_in_flight}): {ours:.2f} s")
        print(f"ratio: {reference / ours:.2f}x")
        print(
            f"cached rerun: {rerun:.3f} s, {server.requests - sent} requests sent, ratio vs first run {ours / rerun:.0f}x"
        )


if __name__ == "__main__":
    main()
