"""`python -m pipeline serve`: the trained model behind an OpenAI-compatible API and a chat page.

Loads the model chosen by ``serve.model`` once, starts the generation worker (continuous
batching, ``batching.BatchEngine``; ``serve.batching=false``: one request at a time,
``engine.Engine``) and serves ``app.create_app`` with uvicorn on ``serve.host:port``
(loopback by default). Not a pipeline stage: it reads a run directory, writes nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.core.errors import PipelineError


def load_model(cfg):
    """(model, tokenizer, meta) for ``serve.model``: latest | pretrain | finetune | a run directory."""
    import torch

    from pipeline.model.runs import (
        WHICH,
        load_run,
        load_run_tokenizer,
        load_trained,
        require_causal_gpt,
        resolve_device,
    )

    sc = cfg.serve
    want = str(sc.model)
    device = resolve_device(sc.get("device", "auto"), "serve.device")
    if want in WHICH:
        model, tokenizer, meta = load_run(cfg, want)
    else:
        run_dir = Path(want)
        if not run_dir.is_dir():
            raise PipelineError(f"serve.model={want}: expected latest, pretrain, finetune or a run directory")
        model, meta = load_trained(run_dir)
        require_causal_gpt(model, run_dir, "serving")
        tokenizer = load_run_tokenizer(run_dir, meta, cfg)
    threads = str(sc.get("threads", "auto"))
    if device == "cpu":  # leave a core to the HTTP event loop: it streams every token
        torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1) if threads == "auto" else max(1, int(threads)))
    return model.to(device).eval(), tokenizer, meta


def build_app(cfg):
    from pipeline.apps.serve.app import create_app
    from pipeline.apps.serve.batching import BatchEngine
    from pipeline.apps.serve.engine import Engine
    from pipeline.apps.serve.metrics import ServeMetrics

    model, tokenizer, meta = load_model(cfg)
    sc = cfg.serve
    metrics = ServeMetrics()
    if bool(sc.batching):
        engine = BatchEngine(model, tokenizer, meta, max_queue=int(sc.max_queue), max_batch=int(sc.max_batch),
                             max_tokens_in_flight=int(sc.max_tokens_in_flight or 0),
                             prefill_tokens_per_step=int(sc.prefill_tokens_per_step), metrics=metrics)
    else:
        engine = Engine(model, tokenizer, meta, max_queue=int(sc.max_queue), metrics=metrics)
    return create_app(engine, sc, seed=int(cfg.seed), metrics=metrics), engine, meta


def run(cfg) -> dict:
    import uvicorn

    app, engine, meta = build_app(cfg)
    sc = cfg.serve
    url = f"http://{sc.host}:{int(sc.port)}"
    print(f"serving {sc.model_name} ({meta.get('stage') or 'model'} from {meta.get('run_dir')}) on {url} "
          f"- chat page at {url}/, API at {url}/v1", flush=True)
    uvicorn.run(app, host=str(sc.host), port=int(sc.port), log_level=str(sc.get("log_level", "warning")))
    return {"served": engine.served}
