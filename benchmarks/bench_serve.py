"""Serving benchmark: aggregate tokens/s and time to first token at 1, 4, 16 and 64 clients,
continuous batching on and off, in the same run.

Starts `python -m pipeline serve` on a free loopback port over a workspace that already has
a trained model (what `python -m pipeline run` produces), once with `serve.batching=true` and
once with `serve.batching=false` (one request at a time, the reference engine). For each
concurrency level the clients are asyncio tasks on one `httpx.AsyncClient` (cheap, so the
2 cores go to the server, not to client threads), each sending streamed chat completions
until the level's requests are done. Prints tokens/s, requests/s, TTFT p50/p90 and the
ratios to one client.

    python benchmarks/bench_serve.py --root . [--requests 64] [--max-tokens 64] [--levels 1,4,16,64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import httpx

QUESTIONS = ["What does json.dumps do?", "What is the glob module?", "How do I use heapq.heappush?",
             "What does textwrap.dedent do?", "What is shlex.split for?", "What does base64.b64encode return?"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def one_level(base: str, clients: int, requests: int, max_tokens: int) -> dict:
    ttft, totals, tokens = [], [], []
    todo = iter(range(requests))

    async def client_loop(http: httpx.AsyncClient) -> None:
        for i in todo:
            body = {"model": "lm-pipeline", "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                    "max_tokens": max_tokens, "temperature": 0.7, "seed": i, "stream": True,
                    "stream_options": {"include_usage": True}}
            t0 = time.perf_counter()
            first, n = None, 0
            async with http.stream("POST", f"{base}/v1/chat/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if event.get("usage"):  # the token count (a chunk may carry several tokens)
                        n = event["usage"]["completion_tokens"]
                    elif event["choices"][0]["delta"].get("content") and first is None:
                        first = time.perf_counter() - t0
            ttft.append(first if first is not None else time.perf_counter() - t0)
            totals.append(time.perf_counter() - t0)
            tokens.append(n)

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(http) for _ in range(clients)))
        wall = time.perf_counter() - t0
    q = sorted(ttft)
    return {"clients": clients, "requests": len(totals), "wall_s": wall, "rps": len(totals) / wall,
            "tok_s": sum(tokens) / wall, "tokens": sum(tokens), "ttft_p50": statistics.median(q),
            "ttft_p90": q[int(0.9 * (len(q) - 1))], "latency_p50": statistics.median(totals)}


def serve(root: str, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "serve", f"paths.root={root}", f"serve.port={port}",
                             "serve.max_queue=256", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            raise SystemExit(f"server did not start: {proc.stdout.read()[-2000:]}")
        time.sleep(0.3)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default=".", help="workspace with models/ (python -m pipeline run)")
    ap.add_argument("--requests", type=int, default=64, help="requests per level (at least the level's clients)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--levels", default="1,4,16,64")
    ap.add_argument("--model", default="latest", help="serve.model: latest | pretrain | finetune | a run dir")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    results = {}
    for mode in ("true", "false"):
        proc, base = serve(args.root, [f"serve.batching={mode}", f"serve.model={args.model}"])
        try:
            asyncio.run(one_level(base, 2, 4, 8))  # warm-up
            results[mode] = [asyncio.run(one_level(base, n, max(args.requests, n), args.max_tokens)) for n in levels]
        finally:
            proc.terminate()
            proc.wait(10)
    print(f"model={args.model} max_tokens={args.max_tokens} requests/level>={args.requests}")
    print(f"{'batching':>8} {'clients':>7} {'requests':>8} {'req/s':>7} {'tok/s':>8} {'x 1 client':>10} "
          f"{'TTFT p50':>9} {'x 1 client':>10} {'TTFT p90':>9} {'latency p50':>11}")
    for mode, rows in results.items():
        one = rows[0]
        for r in rows:
            print(f"{'on' if mode == 'true' else 'off':>8} {r['clients']:>7} {r['requests']:>8} {r['rps']:>7.2f} "
                  f"{r['tok_s']:>8.1f} {r['tok_s'] / one['tok_s']:>9.2f}x {r['ttft_p50']:>8.3f}s "
                  f"{r['ttft_p50'] / one['ttft_p50']:>9.2f}x {r['ttft_p90']:>8.3f}s {r['latency_p50']:>10.3f}s")
    on, off = results["true"], results["false"]
    for a, b in zip(on, off):
        print(f"clients={a['clients']}: batching on / off tokens/s = {a['tok_s'] / b['tok_s']:.2f}x")


if __name__ == "__main__":
    main()
