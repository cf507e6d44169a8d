from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline import config, shard, tokenizer
from pipeline.artifacts import iter_rows, sha256_file
from pipeline.errors import PipelineError
from pipeline.splits import is_val


def _cfg(root, *extra):
    return config.load([f"paths.root={root}", "tokenizer.vocab_size=1024", "shard.val_fraction=0.25", *extra])


def test_tokenizer_trains_bpe_with_special_tokens(clean_corpus):
    cfg = _cfg(clean_corpus)
    summary = tokenizer.run(cfg)
    tok = tokenizer.load(cfg.paths.tokenizer)
    assert tok.get_vocab_size() == 1024
    for i, name in enumerate(["<|endoftext|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]):
        assert tok.token_to_id(name) == i
    text = "def f(x):\n    return x ** 2  # ünïcödé → ok 🙂"
    ids = tok.encode(text).ids
    assert tok.decode(ids) == text
    assert int(tokenizer.token_byte_lengths(tok)[ids].sum()) == len(text.encode("utf-8"))
    # special tokens are atomic and carry no bytes
    chat = tok.encode("<|user|>hi<|end|>").ids
    assert chat[0] == 3 and chat[-1] == 5
    assert tokenizer.token_byte_lengths(tok)[[0, 3, 5]].sum() == 0
    # validation documents are not used to train the vocabulary
    ids_all = [r["id"] for r in iter_rows(cfg.paths.clean, columns=["id"])]
    assert summary["train_docs"] == sum(not is_val(i, 0.25) for i in ids_all)
    stats = json.loads(open(f"{cfg.paths.tokenizer}/stats.json").read())
    assert 2.0 < stats["bytes_per_token"] < 8.0


def test_tokenizer_is_deterministic(clean_corpus):
    cfg = _cfg(clean_corpus)
    tokenizer.run(cfg)
    first = sha256_file(f"{cfg.paths.tokenizer}/tokenizer.json")
    tokenizer.run(cfg)
    assert sha256_file(f"{cfg.paths.tokenizer}/tokenizer.json") == first


def _docs_from_bin(arr, eot):
    cut = np.flatnonzero(arr == eot)
    starts = np.concatenate([[0], cut[:-1] + 1])
    return [arr[s:e] for s, e in zip(starts, cut)]


def test_shard_index_split_and_roundtrip(clean_corpus):
    cfg = _cfg(clean_corpus, "shard.tokens_per_file=20000")
    tokenizer.run(cfg)
    summary = shard.run(cfg)
    index = json.loads(open(f"{cfg.paths.shards}/index.json").read())
    assert index["dtype"] == "uint16" and index["eot_id"] == 0
    tok = tokenizer.load(cfg.paths.tokenizer)
    texts = {r["id"]: r["text"] for r in iter_rows(cfg.paths.clean)}
    for split in ("train", "val"):
        info = index["splits"][split]
        assert info["docs"] > 0
        arrays = shard.open_split(cfg.paths.shards, split)
        assert len(arrays) == len(info["files"])
        for f, arr in zip(info["files"], arrays):
            assert sha256_file(f"{cfg.paths.shards}/{f['name']}") == f["sha256"]
            assert len(arr) == f["tokens"] <= 20000
        stream = np.concatenate(arrays)
        assert len(stream) == info["tokens"]
        docs = _docs_from_bin(stream, 0)
        assert len(docs) == info["docs"]
        decoded = [tok.decode(d.tolist()) for d in docs]
        expected = [t for i, t in texts.items() if is_val(i, 0.25) == (split == "val")]
        assert decoded == expected  # every document, in order, in exactly one split
        assert info["bytes"] == sum(len(t.encode()) for t in expected)
        assert int(tokenizer.token_byte_lengths(tok)[stream].sum()) == info["bytes"]
    assert len(index["splits"]["train"]["files"]) > 1  # the file-size cap split the stream
    assert summary["train_docs"] + summary["val_docs"] == len(texts)


def test_shard_output_is_independent_of_worker_count(clean_corpus):
    cfg1 = _cfg(clean_corpus, "executor.workers=1")
    tokenizer.run(cfg1)
    shard.run(cfg1)
    one = open(f"{cfg1.paths.shards}/index.json").read()
    shard.run(_cfg(clean_corpus, "executor.workers=2"))
    assert open(f"{cfg1.paths.shards}/index.json").read() == one


def test_shard_errors_are_clear(tmp_path, clean_corpus):
    with pytest.raises(PipelineError, match="run `python -m pipeline clean` first"):
        shard.run(_cfg(tmp_path / "nowhere"))
    cfg = _cfg(clean_corpus)
    with pytest.raises(PipelineError, match="run `python -m pipeline tokenizer` first"):
        shard.run(cfg)
    tokenizer.run(cfg)
    with pytest.raises(PipelineError, match="no validation documents"):
        shard.run(_cfg(clean_corpus, "shard.val_fraction=0.0"))
