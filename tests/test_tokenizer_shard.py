from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import run_cli

from pipeline.core import config

from pipeline.stages import shard, tokenizer
from pipeline.core.artifacts import doc_id, hash_tree, sha256_file
from pipeline.core.parquet import iter_rows
from pipeline.core.errors import PipelineError
from pipeline.core.splits import is_val
from pipeline.tokenize import bpe
from pipeline.tokenize import fast as fastenc
from pipeline.tokenize import sample as tsample
from pipeline.tokenize import shards
from pipeline.tokenize import encode as tok_encode

SPECIALS = ["<|endoftext|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


def _cfg(root, *extra):
    return config.load([f"paths.root={root}", "tokenizer.vocab_size=1024", "shard.val_fraction=0.25", *extra])


def test_tokenizer_trains_bpe_with_special_tokens(clean_corpus):
    cfg = _cfg(clean_corpus)
    summary = tokenizer.run(cfg)
    tok = bpe.load(cfg.paths.tokenizer)
    assert tok.get_vocab_size() == 1024
    for i, name in enumerate(SPECIALS):
        assert tok.token_to_id(name) == i
    text = "def f(x):\n    return x ** 2  # ünïcödé → ok 🙂"
    ids = tok.encode(text).ids
    assert tok.decode(ids) == text
    assert int(bpe.token_byte_lengths(tok)[ids].sum()) == len(text.encode("utf-8"))
    # special tokens are atomic and carry no bytes
    chat = tok.encode("<|user|>hi<|end|>").ids
    assert chat[0] == 3 and chat[-1] == 5
    assert bpe.token_byte_lengths(tok)[[0, 3, 5]].sum() == 0
    # validation documents are not used to train the vocabulary
    ids_all = [r["id"] for r in iter_rows(cfg.paths.clean, columns=["id"])]
    assert summary["train_docs"] == sum(not is_val(i, 0.25) for i in ids_all)
    stats = json.loads(Path(f"{cfg.paths.tokenizer}/stats.json").read_text())
    assert 2.0 < stats["bytes_per_token"] < 8.0
    assert stats["vocab_size"] == 1024 and stats["pattern"] == "gpt2"
    # bytes per token on the validation split, per language; Chinese from the shipped sample
    val_texts = [r["text"] for r in iter_rows(cfg.paths.clean) if is_val(r["id"], 0.25)]
    assert stats["val"]["docs"] == len(val_texts)
    assert stats["val"]["bytes"] == sum(len(t.encode()) for t in val_texts)
    assert stats["bytes_per_token"] == stats["val"]["bytes_per_token"]
    assert stats["per_language"]["en"]["source"] == "validation split"
    assert "lang_samples.json" in stats["per_language"]["zh"]["source"]
    assert 0 < stats["per_language"]["zh"]["bytes_per_token"] < stats["per_language"]["en"]["bytes_per_token"]
    assert isinstance(stats["gpt2"], str)  # available offline or says why not; never downloads
    assert stats["roundtrip"]["failures"] == 0 and stats["roundtrip"]["docs"] > 0
    fe = stats["fast_encoder"]
    assert fe["kind"] == "tiktoken" and fe["identical_docs"] == fe["checked_docs"] > 0


def test_tokenizer_is_deterministic(clean_corpus):
    cfg = _cfg(clean_corpus)
    tokenizer.run(cfg)
    first = hash_tree(cfg.paths.tokenizer)
    tokenizer.run(cfg)
    assert hash_tree(cfg.paths.tokenizer) == first


def test_training_sample_is_capped_hash_chosen_and_streamed(clean_corpus):
    rows = [r for r in iter_rows(f"{clean_corpus}/data/clean") if not is_val(r["id"], 0.25)]
    cap = sum(len(r["text"].encode()) for r in rows) // 3
    cfg = _cfg(clean_corpus, f"tokenizer.max_train_bytes={cap}", "tokenizer.vocab_size=400")
    clean_dir, threshold, plan = tsample.training_sample(cfg)
    seen = {"docs": 0, "bytes": 0}
    sample = list(tsample.train_texts(clean_dir, 0.25, plan["seed"], threshold, seen))
    assert 0 < seen["bytes"] <= cap and plan["available_docs"] == len(rows)
    # the kept documents are those with the smallest seeded keys, not the first ones
    keys = sorted((tsample._sample_key(plan["seed"], r["id"]), r["text"]) for r in rows)
    assert set(sample) == {t for _, t in keys[: len(sample)]}
    assert sample != [r["text"] for r in rows[: len(sample)]]
    summary = tokenizer.run(cfg)
    assert summary["train_bytes"] == seen["bytes"] and summary["train_docs"] == len(sample)
    other = tsample.training_sample(_cfg(clean_corpus, f"tokenizer.max_train_bytes={cap}", "tokenizer.sample_seed=7"))
    assert other[1] != threshold


def test_gpt4_pattern(clean_corpus):
    cfg = _cfg(clean_corpus, "tokenizer.pattern=gpt4")
    stats = tokenizer.run(cfg)
    tok = bpe.load(cfg.paths.tokenizer)
    assert stats["pattern"] == "gpt4" and stats["fast_encoder"]["kind"] == "tiktoken"
    # digits are split in groups of at most three, newlines kept apart from words
    pieces = tok.pre_tokenizer.pre_tokenize_str("x = 1234567\n\nfoo")
    assert [p for p, _ in pieces][3:6] == ["123", "456", "7"]
    text = "Prix: 1 234,56 € — naïve 中文 🙂\r\n\tend"
    assert tok.decode(tok.encode(text).ids) == text
    with pytest.raises(PipelineError, match="unknown tokenizer.pattern"):
        tokenizer.run(_cfg(clean_corpus, "tokenizer.pattern=gpt3"))


def _docs_from_bin(arr, eot):
    cut = np.flatnonzero(arr == eot)
    starts = np.concatenate([[0], cut[:-1] + 1])
    return [arr[s:e] for s, e in zip(starts, cut)]


def test_shard_index_split_shuffle_and_roundtrip(clean_corpus):
    cfg = _cfg(clean_corpus, "shard.tokens_per_file=20000", "shard.verify_fraction=1.0")
    tokenizer.run(cfg)
    summary = shard.run(cfg)
    assert summary["encoder"] == "tiktoken" and summary["verified_docs"] == summary["train_docs"] + summary["val_docs"]
    index = json.loads(Path(f"{cfg.paths.shards}/index.json").read_text())
    assert index["dtype"] == "uint16" and index["eot_id"] == 0
    assert index["split"]["val_fraction"] == 0.25 and "is_val" in index["split"]["rule"]
    assert index["order"]["shuffle"] is True and index["order"]["seed"] == cfg.seed
    tok = bpe.load(cfg.paths.tokenizer)
    texts = {r["id"]: r["text"] for r in iter_rows(cfg.paths.clean)}
    seen = {}
    for split in ("train", "val"):
        info = index["splits"][split]
        assert info["docs"] > 0
        arrays = shards.open_split(cfg.paths.shards, split)
        assert len(arrays) == len(info["files"])
        for f, arr in zip(info["files"], arrays):
            assert sha256_file(f"{cfg.paths.shards}/{f['name']}") == f["sha256"]
            assert len(arr) == f["tokens"] <= 20000
        stream = np.concatenate(arrays)
        assert len(stream) == info["tokens"]
        docs = _docs_from_bin(stream, 0)
        assert len(docs) == info["docs"]
        decoded = [tok.decode(d.tolist()) for d in docs]
        members = [i for i in texts if is_val(i, 0.25) == (split == "val")]
        expected = [texts[i] for i in sorted(members, key=lambda i: tok_encode.order_key(cfg.seed, i))]
        assert decoded == expected  # every document, shuffled by its id, in exactly one split
        assert expected != [texts[i] for i in members] or len(members) < 3
        assert info["bytes"] == sum(len(t.encode()) for t in expected)
        assert int(bpe.token_byte_lengths(tok)[stream].sum()) == info["bytes"]
        seen[split] = set(members)
    assert not seen["train"] & seen["val"] and seen["train"] | seen["val"] == set(texts)
    assert len(index["splits"]["train"]["files"]) > 1  # the file-size cap split the stream
    assert summary["train_docs"] + summary["val_docs"] == len(texts)


def test_shard_output_is_byte_identical_across_runs_workers_and_encoders(clean_corpus):
    cfg1 = _cfg(clean_corpus, "executor.workers=1", "shard.tokens_per_file=30000")
    tokenizer.run(cfg1)
    shard.run(cfg1)
    first = hash_tree(cfg1.paths.shards)
    shard.run(cfg1)
    assert hash_tree(cfg1.paths.shards) == first
    s2 = shard.run(_cfg(clean_corpus, "executor.workers=2", "shard.tokens_per_file=30000"))
    assert hash_tree(cfg1.paths.shards) == first and s2["encoder"] == "tiktoken"
    s3 = shard.run(_cfg(clean_corpus, "shard.encoder=tokenizers", "shard.tokens_per_file=30000"))
    assert hash_tree(cfg1.paths.shards) == first and s3["encoder"] == "tokenizers"


def test_tiktoken_mismatch_falls_back_to_tokenizers(clean_corpus, monkeypatch):
    cfg = _cfg(clean_corpus, "executor.workers=1", "shard.verify_fraction=1.0")
    tokenizer.run(cfg)
    shard.run(_cfg(clean_corpus, "shard.encoder=tokenizers"))
    truth = hash_tree(cfg.paths.shards)
    real = fastenc.FastEncoder.encode

    def wrong(self, texts, threads=1):
        return [np.concatenate([ids, ids[:1]]) for ids in real(self, texts, threads)]

    monkeypatch.setattr(fastenc.FastEncoder, "encode", wrong)
    summary = shard.run(cfg)
    assert summary["encoder"] == "tokenizers" and "fell back" in summary["encoder_note"]
    assert hash_tree(cfg.paths.shards) == truth


def test_documents_keep_literal_special_strings_and_bad_rows_are_counted(tmp_path):
    clean = tmp_path / "data" / "clean"
    clean.mkdir(parents=True)
    texts = [f"doc {i}: the end marker <|endoftext|> and <|user|> are text here. " * 20 for i in range(40)]
    rows = [{"id": doc_id(t), "text": t} for t in texts]
    rows.insert(3, {"id": doc_id("x"), "text": None})
    rows.insert(5, {"id": "not-hex", "text": "hello"})
    # the first shard holds no validation document: its empty val piece must not shift the others
    first = [r for r in rows if r["text"] is None or r["id"] == "not-hex" or not is_val(r["id"], 0.3)][:12]
    pq.write_table(pa.Table.from_pylist(first), clean / "part-00000.parquet")
    pq.write_table(pa.Table.from_pylist([r for r in rows if r not in first]), clean / "part-00001.parquet")
    (clean / "part-00002.parquet").write_bytes(b"PAR1 this is not parquet")
    cfg = config.load([f"paths.root={tmp_path}", "tokenizer.vocab_size=300", "shard.val_fraction=0.3"])
    tok_summary = tokenizer.run(cfg)
    assert len(tok_summary["bad_files"]) == 1 and tok_summary["bad_files"][0].startswith("part-00002.parquet")
    summary = shard.run(cfg)
    assert summary["bad_docs"] == {"no text": 1, "bad id": 1}
    assert len(summary["bad_files"]) == 1 and "part-00002.parquet" in summary["bad_files"][0]
    assert summary["train_docs"] + summary["val_docs"] == len(texts)
    stream = np.concatenate(shards.open_split(cfg.paths.shards, "train") + shards.open_split(cfg.paths.shards, "val"))
    assert int((stream == 0).sum()) == len(texts)  # only the boundaries, never the literal strings
    assert int((stream == 3).sum()) == 0
    tok = bpe.load(cfg.paths.tokenizer)
    for split in ("train", "val"):
        got = [tok.decode(d.tolist()) for d in _docs_from_bin(np.concatenate(shards.open_split(cfg.paths.shards, split)), 0)]
        assert sorted(got) == sorted(t for t in texts if is_val(doc_id(t), 0.3) == (split == "val"))


def test_verify_names_the_corrupt_file(clean_corpus):
    cfg = _cfg(clean_corpus, "shard.tokens_per_file=20000")
    tokenizer.run(cfg)
    shard.run(cfg)
    assert shards.verify(cfg.paths.shards, cfg.paths.tokenizer) == {"ok": True, "checked": pytest.approx(0, abs=1e9), "problems": []}
    index = shards.read_index(cfg.paths.shards)
    victim = index["splits"]["train"]["files"][1]["name"]
    path = f"{cfg.paths.shards}/{victim}"
    data = bytearray(Path(path).read_bytes())
    data[len(data) // 2] ^= 0x01
    Path(path).write_bytes(bytes(data))
    report = shards.verify(cfg.paths.shards, cfg.paths.tokenizer)
    assert not report["ok"] and len(report["problems"]) == 1 and report["problems"][0].startswith(f"{victim}: corrupt")
    res = run_cli("shard", "--verify", f"paths.root={clean_corpus}")
    assert res.returncode == 1 and f"{victim}: corrupt: sha256" in res.stdout, res.stdout + res.stderr
    # a truncated file and a changed tokenizer are named too
    Path(path).write_bytes(bytes(data[:-2]))
    (clean_corpus / "data/tokenizer/tokenizer.json").write_text(
        (clean_corpus / "data/tokenizer/tokenizer.json").read_text() + "\n"
    )
    problems = shards.verify(cfg.paths.shards, cfg.paths.tokenizer)["problems"]
    assert any(p.startswith(victim) and "bytes" in p for p in problems)
    assert any("tokenizer changed" in p for p in problems)


def test_shard_errors_are_clear(tmp_path, clean_corpus):
    with pytest.raises(PipelineError, match="run `python -m pipeline clean` first"):
        shard.run(_cfg(tmp_path / "nowhere"))
    cfg = _cfg(clean_corpus)
    with pytest.raises(PipelineError, match="run `python -m pipeline tokenizer` first"):
        shard.run(cfg)
    tokenizer.run(cfg)
    with pytest.raises(PipelineError, match="no validation documents"):
        shard.run(_cfg(clean_corpus, "shard.val_fraction=0.0"))
    with pytest.raises(PipelineError, match="unknown shard.encoder"):
        shard.run(_cfg(clean_corpus, "shard.encoder=fastest"))


def test_large_vocab_gives_uint32_and_added_tokens_use_tokenizers(tmp_path):
    assert shards.dtype_for(65536) == np.dtype("<u2") and shards.dtype_for(65537) == np.dtype("<u4")
    clean = tmp_path / "data" / "clean"
    clean.mkdir(parents=True)
    texts = [f"document {i}: zz{65535 - i:05d} is an added token, 中文 and 🙂 are not. " * 30 for i in range(30)]
    pq.write_table(pa.Table.from_pylist([{"id": doc_id(t), "text": t} for t in texts]), clean / "part-00000.parquet")
    cfg = config.load([f"paths.root={tmp_path}", "tokenizer.vocab_size=300", "shard.val_fraction=0.4"])
    tokenizer.run(cfg)
    tok = bpe.load(cfg.paths.tokenizer)
    tok.add_tokens([f"zz{i:05d}" for i in range(65536)])  # non-special: matched before BPE
    tok.save(f"{cfg.paths.tokenizer}/tokenizer.json")
    assert fastenc.fast_encoder(tok)[0] is None
    summary = shard.run(cfg)
    assert summary["encoder"] == "tokenizers" and summary["dtype"] == "uint32"
    arrays = shards.open_split(cfg.paths.shards, "val")
    assert arrays[0].dtype == np.dtype("<u4") and int(np.concatenate(arrays).max()) > 65535
    got = [tok.decode(d.tolist()) for d in _docs_from_bin(np.concatenate(arrays), 0)]
    assert sorted(got) == sorted(t for t in texts if is_val(doc_id(t), 0.4))
