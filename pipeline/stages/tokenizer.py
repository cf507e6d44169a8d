"""Tokenizer stage: train a byte-level BPE on a sample of the cleaned training documents.

Byte-level BPE (GPT-2 style) never meets an unknown character, and every token maps to a
fixed byte string, which is what makes bits-per-byte exact downstream. Validation documents
are left out of training so held-out scores are not flattered by the vocabulary.

`tokenizer.json` (Hugging Face `tokenizers`) is the single source of truth. Beside it:
`tokenizer_config.json` (special tokens and the chat template, so `transformers` loads the
directory as a chat tokenizer) and `stats.json` (compression on the validation split,
overall and per language, and against GPT-2's tokenizer when it is available offline).

The library parts live in `pipeline/tokenize/`: `bpe` (recipe, loading, byte strings),
`sample` (the training sample), `stats` and `fast` (tiktoken with the same ids, used by shard).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.core.artifacts import (
    Timer,
    atomic_dir,
    sha256_file,
    write_json,
    write_summary,
)
from pipeline.core.errors import PipelineError
from pipeline.tokenize.bpe import (
    build,
    tokenizer_config,
)
from pipeline.tokenize.sample import train_texts, training_sample
from pipeline.tokenize.special import SPECIAL_TOKENS
from pipeline.tokenize.stats import compute_stats



def run(cfg) -> dict:
    timer = Timer()
    files, threshold, plan = training_sample(cfg)
    clean_dir = Path(cfg.paths.clean)
    seen = {"docs": 0, "bytes": 0}
    tok, trainer = build(cfg.tokenizer)
    seed, val_fraction = plan["seed"], float(cfg.shard.val_fraction)
    tok.train_from_iterator(train_texts(files, val_fraction, seed, threshold, seen, batched=True), trainer=trainer)
    if seen["docs"] == 0:
        raise PipelineError(f"no training documents in {clean_dir} (all held out or empty)")
    train_seconds = timer.seconds
    stats = {
        "vocab_size": tok.get_vocab_size(),
        "pattern": str(cfg.tokenizer.get("pattern", "gpt2")),
        "special_tokens": {t: tok.token_to_id(t) for t in SPECIAL_TOKENS},
        "train_docs": seen["docs"],
        "train_bytes": seen["bytes"],
        "train_sample": plan,
        **compute_stats(tok, cfg, files),
    }
    out = Path(cfg.paths.tokenizer)
    with atomic_dir(out) as tmp:
        tok.save(str(tmp / "tokenizer.json"))
        write_json(tmp / "tokenizer_config.json", tokenizer_config(tok))
        write_json(tmp / "stats.json", stats)
        summary = write_summary(
            tmp, "tokenizer", cfg, {"clean": clean_dir}, timer,
            tokenizer_sha256=sha256_file(tmp / "tokenizer.json"), train_seconds=train_seconds,
            bad_files=plan["bad_files"],
            **{k: v for k, v in stats.items() if k not in ("per_language", "val", "train_sample")},
        )
    return summary
