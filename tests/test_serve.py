"""`python -m pipeline serve`: the official `openai` client against a real server on loopback,
bad requests, concurrency, disconnects, and the chat page in headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

openai = pytest.importorskip("openai")  # a dev dependency

BLOCK = 64
NAME = "lm-pipeline"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_model(root: Path) -> None:
    """A real tokenizer and a real (randomly initialised) GPT saved as a fine-tuning run."""
    import torch

    from fixtures import pydoc_text, write_tokenizer
    from pipeline.model.runs import build_model

    tok_dir = root / "data/tokenizer"
    write_tokenizer(tok_dir, [pydoc_text(m) for m in ("json", "textwrap", "shlex", "glob", "heapq")], vocab_size=400)
    from pipeline.tokenize.bpe import load

    V = load(tok_dir).get_vocab_size()
    torch.manual_seed(3)
    gpt = build_model({"n_layer": 2, "n_head": 2, "d_model": 32, "mlp_hidden": 64, "block_size": BLOCK}, V)
    # a few seconds of training, so greedy answers are text rather than repeated special tokens
    tok = load(tok_dir)
    chat = "".join(f"<|user|>What does {m} do?<|end|><|assistant|>{pydoc_text(m)[:300]}<|end|>"
                   for m in ("json", "glob", "heapq", "shlex"))
    ids = torch.tensor(tok.encode(chat).ids * 4)
    opt = torch.optim.AdamW(gpt.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(120):
        starts = torch.randint(0, len(ids) - BLOCK - 1, (8,), generator=g)
        xy = torch.stack([ids[s : s + BLOCK + 1] for s in starts.tolist()])
        loss = torch.nn.functional.cross_entropy(gpt(xy[:, :-1]).reshape(-1, V), xy[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    gpt.eval()
    run = root / "models/finetune"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": {f"model.{k}": v for k, v in gpt.state_dict().items()}}, run / "checkpoints/last.ckpt")
    (run / "meta.json").write_text(json.dumps({"model": gpt.cfg.to_dict(), "vocab_size": V, "block_size": BLOCK,
                                               "stage": "finetune"}))
    shutil.copy(tok_dir / "tokenizer.json", run / "tokenizer.json")


def start_server(root: Path, *overrides: str, env: dict | None = None):
    """`python -m pipeline serve` on a free loopback port; yields its base URL, then stops it."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "serve", f"paths.root={root}", f"serve.port={port}", *overrides],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"server did not start: {proc.stdout.read()[-3000:]}")
        time.sleep(0.3)
    yield base
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    _write_model(root)
    yield from start_server(root, "serve.max_queue=8", "serve.max_body_bytes=20000", "serve.default_max_tokens=16")


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)


def _chat(client, content: str, **kw):
    return client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": content}], **kw)


def test_models_and_completion(client, server):
    assert [m.id for m in client.models.list().data] == [NAME]
    out = client.completions.create(model=NAME, prompt="The json module", max_tokens=12, temperature=0, seed=1)
    choice = out.choices[0]
    assert choice.finish_reason in ("length", "stop") and out.usage.completion_tokens <= 12
    assert out.usage.prompt_tokens > 3
    if choice.finish_reason == "length":
        assert out.usage.completion_tokens == 12
    again = client.completions.create(model=NAME, prompt="The json module", max_tokens=12, temperature=0, seed=1)
    assert again.choices[0].text == choice.text  # greedy is deterministic
    health = httpx.get(f"{server}/health").json()
    assert health["status"] == "ok" and health["block_size"] == BLOCK


def test_streamed_chat_equals_non_streamed(client):
    kw = dict(max_tokens=24, temperature=0, seed=7)
    whole = _chat(client, "What does json.dumps do?", **kw)
    text = whole.choices[0].message.content
    assert whole.choices[0].message.role == "assistant" and text
    pieces, finish = [], None
    for chunk in _chat(client, "What does json.dumps do?", stream=True, **kw):
        delta = chunk.choices[0].delta
        if delta.content:
            pieces.append(delta.content)
        finish = chunk.choices[0].finish_reason or finish
    assert "".join(pieces) == text and finish == whole.choices[0].finish_reason
    assert len(pieces) > 1  # streamed token by token, not in one piece
    # sampling with a seed is reproducible too, streamed or not
    kw = dict(max_tokens=16, temperature=1.0, top_p=0.9, seed=11)
    a = _chat(client, "Hello", **kw).choices[0].message.content
    b = "".join(c.choices[0].delta.content or "" for c in _chat(client, "Hello", stream=True, **kw))
    assert a == b


def test_stop_sequences(client):
    base = client.completions.create(model=NAME, prompt="def f(x):", max_tokens=20, temperature=0).choices[0].text
    assert len(base) > 4
    stop = base[2:4]
    cut = client.completions.create(model=NAME, prompt="def f(x):", max_tokens=20, temperature=0, stop=[stop])
    assert cut.choices[0].text == base[: base.find(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=NAME, prompt="def f(x):", max_tokens=20, temperature=0, stop=stop, stream=True))
    assert streamed == cut.choices[0].text


def test_bad_requests_get_openai_errors(client, server):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, "hi", max_tokens=BLOCK + 50)
    assert e.value.body["code"] == "context_length_exceeded" and "max_tokens" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        _chat(client, "hi", temperature=5)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=NAME, prompt="x" * 2000, max_tokens=8)  # prompt beyond the context
    # missing fields and wrong types, sent raw
    for body in ({"model": NAME}, {"model": NAME, "messages": "hi"}, {"messages": [{"role": "user", "content": "x"}]},
                 {"model": NAME, "messages": [{"role": "robot", "content": "x"}]},
                 {"model": NAME, "messages": [{"role": "user", "content": "x"}], "max_tokens": "many"}):
        r = httpx.post(f"{server}/v1/chat/completions", json=body)
        assert r.status_code == 400, (body, r.text)
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["message"]
    r = httpx.post(f"{server}/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400
    # oversized bodies, with a length and chunked
    big = {"model": NAME, "messages": [{"role": "user", "content": "x" * 30000}]}
    r = httpx.post(f"{server}/v1/chat/completions", json=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():
        data = json.dumps(big).encode()
        for i in range(0, len(data), 4096):
            yield data[i : i + 4096]

    r = httpx.post(f"{server}/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    # a small chunked request still goes through the same path and works
    small = json.dumps({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}).encode()
    r = httpx.post(f"{server}/v1/chat/completions", content=iter([small[:10], small[10:]]),
                   headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    # and the server keeps serving
    assert _chat(client, "still there?", max_tokens=4, temperature=0).choices[0].message.content is not None


def test_concurrent_requests_never_interleave(client):
    prompts = [f"Question number {i}: what does module {m} do?" for i, m in enumerate(("json", "re", "os", "sys"))]
    kw = dict(max_tokens=20, temperature=0, seed=0)
    alone = [_chat(client, p, **kw).choices[0].message.content for p in prompts]
    results: dict[int, str] = {}

    def worker(i: int) -> None:
        c = openai.OpenAI(base_url=str(client.base_url), api_key="unused", max_retries=0, timeout=120)
        results[i] = "".join(ch.choices[0].delta.content or "" for ch in _chat(c, prompts[i], stream=True, **kw))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert [results.get(i) for i in range(len(prompts))] == alone


def test_disconnected_client_frees_its_slot(client, server):
    with httpx.stream("POST", f"{server}/v1/completions", json={
        "model": NAME, "prompt": "a", "max_tokens": BLOCK - 4, "temperature": 0, "stream": True,
    }, timeout=30) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # one token, then hang up
    deadline = time.time() + 30
    while time.time() < deadline:
        h = httpx.get(f"{server}/health").json()
        if h["running"] == 0 and h["queued"] == 0:
            break
        time.sleep(0.1)
    assert h["running"] == 0 and h["queued"] == 0
    assert _chat(client, "next", max_tokens=4, temperature=0).choices[0].finish_reason in ("length", "stop")


def test_chat_page_streams_an_answer_in_chromium(server, client):
    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Chromium is not installed: `apt-get install chromium` (scripts/setup.sh does it as root)"
    expected = _chat(client, "What is json?", max_tokens=20, temperature=0).choices[0].message.content
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page()
            external = []
            page.on("request", lambda r: external.append(r.url) if not r.url.startswith(server) else None)
            page.goto(server + "/")
            page.fill("#temperature", "0")
            page.fill("#max-tokens", "20")
            page.fill("#input", "What is json?")
            page.click("#send")
            page.wait_for_selector(".msg.assistant[data-done='true'], .msg.error", timeout=60_000)
            answer = page.text_content(".msg.assistant")
            stats = page.text_content("#stats")
            # the conversation is kept: a second turn shows four bubbles
            page.fill("#input", "And json.dumps?")
            page.click("#send")
            page.wait_for_function("document.querySelectorAll('.msg.assistant[data-done=\"true\"]').length == 2",
                                   timeout=60_000)
            bubbles = page.eval_on_selector_all(".msg", "els => els.map(e => e.className)")
        finally:
            browser.close()
    assert answer == expected
    assert "tok/s" in stats
    assert bubbles == ["msg user", "msg assistant", "msg user", "msg assistant"]
    assert external == []  # nothing fetched from anywhere but this server
