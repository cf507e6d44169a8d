"""Serving benchmark: requests/s and time to first token at 1, 4 and 16 concurrent clients.

Starts `python -m pipeline serve` on a free loopback port over a workspace that already has
a trained model (what `python -m pipeline run` produces), then, for each concurrency level,
runs that many clients in threads, each sending streamed chat completions with the
official `openai` client, and reports requests/s, generated tokens/s, and the median and
p90 time to first token. One generation worker serves requests in order, so TTFT grows
with the queue while throughput stays that of one sequence at a time.

    python benchmarks/bench_serve.py --root . [--requests 32] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

import httpx
import openai


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


QUESTIONS = ["What does json.dumps do?", "What is the glob module?", "How do I use heapq.heappush?",
             "What does textwrap.dedent do?", "What is shlex.split for?", "What does base64.b64encode return?"]


def one_level(base: str, clients: int, requests: int, max_tokens: int) -> dict:
    ttft, totals, tokens = [], [], []
    lock = threading.Lock()
    counter = iter(range(requests))

    def client_loop() -> None:
        c = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=600)
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            t0 = time.perf_counter()
            first, n = None, 0
            stream = c.chat.completions.create(
                model="lm-pipeline", messages=[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                max_tokens=max_tokens, temperature=0.7, seed=i, stream=True)
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    if first is None:
                        first = time.perf_counter() - t0
                    n += 1
            with lock:
                ttft.append(first if first is not None else time.perf_counter() - t0)
                totals.append(time.perf_counter() - t0)
                tokens.append(n)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    q = sorted(ttft)
    return {"clients": clients, "requests": len(totals), "wall_s": wall, "rps": len(totals) / wall,
            "tok_s": sum(tokens) / wall, "ttft_p50": statistics.median(q), "ttft_p90": q[int(0.9 * (len(q) - 1))],
            "latency_p50": statistics.median(totals)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default=".", help="workspace with models/ (python -m pipeline run)")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--levels", default="1,4,16")
    args = ap.parse_args()
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "serve", f"paths.root={args.root}",
                             f"serve.port={port}", "serve.max_queue=64"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise SystemExit(f"server did not start: {proc.stdout.read()[-2000:]}")
            time.sleep(0.3)
        one_level(base, 1, 2, 8)  # warm-up
        print(f"{'clients':>7} {'requests':>8} {'req/s':>7} {'tok/s':>7} {'TTFT p50':>9} {'TTFT p90':>9} {'latency p50':>11}")
        for level in (int(x) for x in args.levels.split(",")):
            r = one_level(base, level, max(args.requests, level), args.max_tokens)
            print(f"{r['clients']:>7} {r['requests']:>8} {r['rps']:>7.2f} {r['tok_s']:>7.1f} {r['ttft_p50']:>8.3f}s "
                  f"{r['ttft_p90']:>8.3f}s {r['latency_p50']:>10.3f}s", flush=True)
    finally:
        proc.terminate()
        proc.wait(10)


if __name__ == "__main__":
    main()
