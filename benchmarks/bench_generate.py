"""Generation speed: our KV-cached decoding vs recomputing the context, and vs
`transformers.generate` on the exported model, in one run on the same weights.

Usage: python benchmarks/bench_generate.py [--model gpt_small] [--new-tokens 256] [--run DIR] [overrides]
With no --run, the model is the `conf/model/<name>.yaml` architecture with random weights
(speed does not depend on the weights) and a 512-token BPE trained on a few pydoc pages;
with --run, a trained run directory (e.g. models/pretrain). Decoding is greedy with no stop
token, so every configuration produces exactly --new-tokens tokens. The export goes to a
temporary directory and is loaded back with `AutoModelForCausalLM.from_pretrained`.
Prints tokens/s per configuration and the ratios.
"""

from __future__ import annotations

import argparse
import pydoc
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.core.config import load  # noqa: E402
from pipeline.model.hf import export_hf
from pipeline.model.sampling import generate_ids
from pipeline.model.runs import build_model, load_trained  # noqa: E402


def tiny_tokenizer(vocab_size: int):
    from omegaconf import OmegaConf

    from pipeline.tokenize.bpe import build

    specials = ["<|endoftext|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    tok, trainer = build(OmegaConf.create({"vocab_size": vocab_size, "min_frequency": 2, "special_tokens": specials}))
    texts = [pydoc.render_doc(__import__(m), renderer=pydoc.plaintext) for m in ("json", "textwrap", "shlex", "csv")]
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def timed(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gpt_small", help="conf/model option (random weights)")
    ap.add_argument("--run", default=None, help="a trained run directory instead of --model")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for the model, e.g. model.block_size=512")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if args.run:
        from pipeline.model.runs import load_run_tokenizer

        model, meta = load_trained(args.run)
        tok = load_run_tokenizer(Path(args.run), meta)
        name = f"run {args.run}"
    else:
        tok = tiny_tokenizer(512)
        torch.manual_seed(0)
        model = build_model(load([f"model={args.model}", *args.overrides]).model, tok.get_vocab_size()).eval()
        name = f"model={args.model} (random weights)"
    c = model.cfg
    n, p = args.new_tokens, args.prompt_tokens
    if p + n > c.block_size:
        raise SystemExit(f"prompt {p} + new {n} tokens exceed block_size {c.block_size}: pick a larger model")
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(6, c.vocab_size, (p,), generator=g).tolist()

    results = {}
    secs, ours = timed(lambda: generate_ids(model, prompt, n), args.repeats)
    results["ours, KV cache"] = secs
    secs, ours_nc = timed(lambda: generate_ids(model, prompt, n, use_cache=False), args.repeats)
    results["ours, no cache"] = secs
    assert ours == ours_nc, "cached and uncached greedy decoding disagree"

    with tempfile.TemporaryDirectory() as d:
        export_hf(model, tok, Path(d))
        hf = AutoModelForCausalLM.from_pretrained(d).eval()
        ids = torch.tensor([prompt])
        kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                  pad_token_id=tok.token_to_id("<|pad|>"), attention_mask=torch.ones_like(ids))
        with torch.no_grad():
            secs, theirs = timed(lambda: hf.generate(ids, use_cache=True, **kw), args.repeats)
            results["transformers.generate, KV cache"] = secs
            secs, _ = timed(lambda: hf.generate(ids, use_cache=False, **kw), args.repeats)
            results["transformers.generate, no cache"] = secs
    theirs = theirs[0, p:].tolist()
    same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), len(ours))

    print(f"{name}: {model.num_params() / 1e6:.2f}M params, {c.n_layer} layers, d_model {c.d_model}, "
          f"arch {c.arch}; prompt {p} tokens, {n} new tokens, greedy, {torch.get_num_threads()} threads, "
          f"best of {args.repeats}")
    print("| configuration | seconds | new tokens/s |")
    print("| --- | --- | --- |")
    for k, s in results.items():
        print(f"| {k} | {s:.2f} | {n / s:,.1f} |")
    print(f"KV cache speedup (ours): {results['ours, no cache'] / results['ours, KV cache']:.2f}x")
    print(f"ours vs transformers.generate (both cached): "
          f"{results['transformers.generate, KV cache'] / results['ours, KV cache']:.2f}x")
    print(f"greedy tokens identical to transformers for the first {same} of {n}")


if __name__ == "__main__":
    main()
