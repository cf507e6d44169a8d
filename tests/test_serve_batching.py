"""Continuous batching: many requests decoded together give each exactly what it gets alone;
limits, cancellation, the API key, Prometheus metrics, and the chat page asking for the key."""

from __future__ import annotations

import asyncio
import shutil

import httpx
import pytest

from tests.test_serve import NAME, _write_model, start_server

PROMPTS = ["The json module", "What does glob do?", "heapq", "<|user|>What does shlex do?<|end|><|assistant|>",
           "Return a list of paths matching a pathname pattern.", "import", "def dumps(obj, *, skipkeys=False",
           "The", "x" * 40, "Split the string s using shell-like syntax.", "a b c d e f g", "json.loads(s)",
           "Help on module textwrap:", "NAME", "DESCRIPTION\n    This module", "Push item onto heap"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from pipeline.core.config import load
    from pipeline.model.runs import load_run

    root = tmp_path_factory.mktemp("batching")
    _write_model(root)
    m, tok, meta = load_run(load([f"paths.root={root}"]), "finetune")
    return m.eval(), tok, meta, root


def _serve(engine, specs: list[dict], concurrent: bool) -> list[tuple[str, str, int]]:
    """(text, finish_reason, completion_tokens) per request, all submitted at once or one by one."""
    from pipeline.apps.serve.engine import DONE, Job

    async def one(spec, loop):
        job = engine.submit(Job(ids=engine.encode(spec["prompt"]), max_tokens=spec["max_tokens"],
                                temperature=spec.get("temperature", 0.0), top_p=spec.get("top_p"),
                                top_k=spec.get("top_k"), seed=spec.get("seed", 0), stop=spec.get("stop", []),
                                loop=loop))
        pieces = []
        while (item := await job.out.get()) is not DONE:
            if isinstance(item, Exception):
                raise item
            pieces.append(item)
        return "".join(pieces), job.finish_reason, job.completion_tokens

    async def main():
        loop = asyncio.get_running_loop()
        if concurrent:
            return await asyncio.gather(*(one(s, loop) for s in specs))
        return [await one(s, loop) for s in specs]

    return asyncio.run(main())


def _specs():
    specs = []
    for i, p in enumerate(PROMPTS):
        spec = {"prompt": p, "max_tokens": 8 + (i * 5) % 30}
        if i % 3 == 0:
            spec["stop"] = [" the", "\n"]
        specs.append(spec)
    return specs


def test_sixteen_concurrent_greedy_requests_equal_each_alone(model):
    from pipeline.apps.serve.batching import BatchEngine

    m, tok, meta, _ = model
    engine = BatchEngine(m, tok, meta, max_batch=16, max_queue=64)
    specs = _specs()
    together = _serve(engine, specs, concurrent=True)
    alone = _serve(engine, specs, concurrent=False)
    assert together == alone
    assert any(r[1] == "stop" for r in together) and any(r[1] == "length" for r in together)
    assert sum(r[2] for r in together) > 100, "the requests really generated"


def test_more_requests_than_slots_wait_and_a_small_token_budget_still_serves_all(model):
    from pipeline.apps.serve.batching import BatchEngine

    m, tok, meta, _ = model
    specs = _specs()
    reference = _serve(BatchEngine(m, tok, meta, max_batch=16), specs, concurrent=False)
    engine = BatchEngine(m, tok, meta, max_batch=16, max_tokens_in_flight=60, prefill_tokens_per_step=8)
    assert _serve(engine, specs, concurrent=True) == reference
    assert engine.served == len(specs)


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(model):
    from pipeline.apps.serve.batching import BatchEngine

    m, tok, meta, _ = model
    engine = BatchEngine(m, tok, meta, max_batch=16)
    specs = [{"prompt": p, "max_tokens": 20, "temperature": 0.9, "top_p": 0.9, "top_k": 40, "seed": i}
             for i, p in enumerate(PROMPTS[:8])]
    first = _serve(engine, specs, concurrent=True)
    assert _serve(engine, specs, concurrent=True) == first
    assert _serve(engine, specs, concurrent=False) == first
    assert len({r[0] for r in first}) > 1


def test_a_cancelled_request_frees_its_slot_at_the_next_step(model):
    from pipeline.apps.serve.batching import BatchEngine
    from pipeline.apps.serve.engine import DONE, Job

    m, tok, meta, _ = model
    engine = BatchEngine(m, tok, meta, max_batch=2)

    async def main():
        loop = asyncio.get_running_loop()
        job = engine.submit(Job(ids=engine.encode("The json module"), max_tokens=60, temperature=0.0, top_p=None,
                                top_k=None, seed=0, stop=[], loop=loop))
        while engine.running() == 0:
            await asyncio.sleep(0.001)
        job.cancelled.set()
        while (item := await job.out.get()) is not DONE:
            pass
        return job

    job = asyncio.run(main())
    assert job.finish_reason == "cancelled" and job.completion_tokens < 60
    assert engine.running() == 0


@pytest.fixture(scope="module")
def keyed_server(model):
    *_, root = model
    yield from start_server(root, "serve.default_max_tokens=16", env={"PIPELINE_SERVE_API_KEY": "s3cret"})


def test_api_key_is_required_and_errors_are_openai_shaped(keyed_server):
    openai = pytest.importorskip("openai")
    body = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        r = httpx.post(f"{keyed_server}/v1/chat/completions", json=body, headers=headers)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key" and r.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{keyed_server}/v1", api_key="wrong", max_retries=0).models.list()
    good = openai.OpenAI(base_url=f"{keyed_server}/v1", api_key="s3cret", max_retries=0)
    out = good.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "What is json?"}],
                                       max_tokens=6, temperature=0)
    assert out.usage.completion_tokens >= 1
    assert httpx.get(f"{keyed_server}/health").status_code == 200  # liveness probes need no key
    # streamed with usage: the last chunk counts the tokens (chunks may carry several)
    chunks = list(good.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "What is json?"}],
                                               max_tokens=6, temperature=0, stream=True,
                                               stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens and not chunks[-1].choices
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == out.choices[0].message.content


def test_metrics_in_prometheus_format(keyed_server):
    from prometheus_client.parser import text_string_to_metric_families

    headers = {"Authorization": "Bearer s3cret"}
    for i in range(3):
        httpx.post(f"{keyed_server}/v1/completions", headers=headers, timeout=60,
                   json={"model": NAME, "prompt": PROMPTS[i], "max_tokens": 5, "temperature": 0})
    r = httpx.get(f"{keyed_server}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    for name in ("pipeline_serve_queue_depth", "pipeline_serve_running_sequences", "pipeline_serve_tokens_per_second",
                 "pipeline_serve_generated_tokens", "pipeline_serve_time_to_first_token_seconds",
                 "pipeline_serve_request_latency_seconds", "pipeline_serve_requests"):
        assert name in families, name
    ttft = {s.name: s.value for s in families["pipeline_serve_time_to_first_token_seconds"].samples}
    assert ttft["pipeline_serve_time_to_first_token_seconds_count"] >= 3
    tokens = [s.value for s in families["pipeline_serve_generated_tokens"].samples if s.name.endswith("_total")]
    assert tokens and tokens[0] >= 3


def test_the_chat_page_asks_for_the_key(keyed_server):
    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Chromium is not installed: `apt-get install chromium` (scripts/setup.sh does it as root)"
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            asked = []
            page.on("dialog", lambda d: (asked.append(d.message), d.accept("s3cret")))
            page.goto(keyed_server + "/")
            page.fill("#max-tokens", "8")
            page.fill("#input", "What is json?")
            page.click("#send")
            page.wait_for_selector(".msg.assistant[data-done='true'], .msg.error", timeout=60_000)
            errors = page.eval_on_selector_all(".msg.error", "els => els.map(e => e.textContent)")
            stored = page.evaluate("localStorage.getItem('apiKey')")
        finally:
            browser.close()
    assert asked == ["This server needs an API key"] and errors == [] and stored == "s3cret"
