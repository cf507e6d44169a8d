"""The tokenizer's interop: exact round trips, tiktoken ids equal to `tokenizers` ids, and
`transformers` loading the saved directory with the same ids and the fine-tuning chat format."""

from __future__ import annotations

import json

import pytest
from conftest import write_clean_corpus
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from pipeline.core import config

from pipeline.stages import tokenizer
from pipeline.tokenize import bpe
from pipeline.tokenize import fast as fastenc
from pipeline.tokenize import sample as tsample
from pipeline.tokenize import stats as tstats

MULTILINGUAL = [
    "json 模块可以把 Python 对象编码为 JSON 文本。列表是一种可变序列，切片会返回新列表。",
    "日本語のテキスト、한국어 텍스트, русский текст, ελληνικά, עברית, العربية, हिन्दी",
    "emoji: 🙂👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️ and skin tones, ZWJ sequences and flags",
    (
        "tabs\tand\t\ttabs, CRLF\r\nlines\r\n\r\n, NBSP\u00a0here, ideographic\u3000space, zero\u200bwidth, "
        "em\u2003space, line\u2028separator, trailing spaces   \n   leading\n\n\n\n"
    ),
    "combining: e\u0301 vs é, ﬁ ligature, Ångström, ß, İstanbul, ＦＵＬＬＷＩＤＴＨ, 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "literal specials are text: <|endoftext|> <|user|>hi<|end|> and '<|pad|>'",
    "code:\n    def f(x):\n        return {'a': [1, 2_000, 3.5e-7], \"b\": None}  # ok\n" + " " * 40 + "x",
    "digits 1234567890 12,345.678 0x1F and contractions: don't, I'LL, we've, she'd",
    "",
    " ",
    "\x00\x01 control \x7f chars and a lone \ufeff BOM",
]


@pytest.fixture(scope="module", params=["gpt2", "gpt4"])
def trained(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"tok-{request.param}")
    write_clean_corpus(root)
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    cfg = config.load([f"paths.root={root}", "tokenizer.vocab_size=1024", "shard.val_fraction=0.25",
                       f"tokenizer.pattern={request.param}"])
    GlobalHydra.instance().clear()
    tokenizer.run(cfg)
    return root / "data" / "tokenizer"


def test_round_trip_and_tiktoken_ids_are_exact(trained):
    tok = bpe.load(trained)
    fast = fastenc.FastEncoder(tok)
    texts = MULTILINGUAL + [t * 3 for t in MULTILINGUAL]
    truth = bpe.encode_plain(tok, texts)
    for text, ids, got in zip(texts, truth, fast.encode(texts)):
        assert tok.decode(ids, skip_special_tokens=False) == text
        assert got.tolist() == ids
        assert fast.decode_bytes(got) == text.encode("utf-8")
    assert fast.fallback_docs == 0 and int(fast.unsafe.sum()) == 0


def test_transformers_loads_the_same_ids_and_chat_format(trained):
    transformers = pytest.importorskip("transformers")
    from pipeline.training.sft_data import encode_pair
    from pipeline.tokenize.special import chat_prompt

    tok = bpe.load(trained)
    by_file = transformers.PreTrainedTokenizerFast(tokenizer_file=str(trained / "tokenizer.json"))
    by_dir = transformers.AutoTokenizer.from_pretrained(str(trained))
    for text in MULTILINGUAL:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert by_file.encode(text, add_special_tokens=False) == ids
        assert by_dir.encode(text, add_special_tokens=False) == ids
        assert by_dir.decode(ids) == text
    assert (by_dir.eos_token, by_dir.pad_token, by_dir.bos_token) == ("<|endoftext|>", "<|pad|>", "<|endoftext|>")
    assert (by_dir.eos_token_id, by_dir.pad_token_id) == (0, 1)
    q, system = "What does json.dumps do?", "Answer briefly."
    for sys_msg in (None, system):
        msgs = ([{"role": "system", "content": sys_msg}] if sys_msg else []) + [{"role": "user", "content": q}]
        text = by_dir.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert text == "<|endoftext|>" + chat_prompt(q, sys_msg)
        ids, labels = encode_pair(tok, q, "It serializes.", sys_msg)
        prompt_ids = [i for i, lab in zip(ids, labels) if lab == -100]
        assert by_dir(text, add_special_tokens=False)["input_ids"] == prompt_ids
    with pytest.raises(Exception, match="unknown chat role"):
        by_dir.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def _toy_bpe(merges: list[tuple[str, str]]) -> Tokenizer:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|endoftext|>": 0, **{c: i + 1 for i, c in enumerate(alphabet)}}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def test_unlisted_merge_is_detected_and_reencoded():
    # tiktoken would merge a+bc into "abc" (a token), but the merge list only makes it from ab+c
    tok = _toy_bpe([("b", "c"), ("a", "b"), ("ab", "c")])
    fast = fastenc.FastEncoder(tok)
    raw = fast.enc.encode_ordinary("abc")
    assert fast.rank_to_id[raw].tolist() == [tok.token_to_id("abc")]  # what plain tiktoken says
    assert tok.encode("abc").ids == [tok.token_to_id("a"), tok.token_to_id("bc")]  # the truth
    assert fast.unsafe[fast.enc.encode_single_token(b"abc")]
    got = fast.encode(["abc abc", "ab"])
    assert [g.tolist() for g in got] == bpe.encode_plain(tok, ["abc abc", "ab"])
    assert fast.fallback_docs == 1  # only the document that contained the unsafe token


def test_unconvertible_tokenizers_say_why():
    tok = _toy_bpe([("a", "b")])
    tok.normalizer = __import__("tokenizers").normalizers.NFKC()
    fast, why = fastenc.fast_encoder(tok)
    assert fast is None and "normalizer" in why
    spec = json.loads(_toy_bpe([]).to_str())
    spec["pre_tokenizer"] = {"type": "Whitespace"}
    fast, why = fastenc.fast_encoder(Tokenizer.from_str(json.dumps(spec)))
    assert fast is None and "pre-tokenizer" in why
    assert not fastenc.FastEncoder(_toy_bpe([("a", "b")])).unsafe.any()


def test_stats_compare_with_gpt2_when_it_loads(trained, monkeypatch):
    """GPT-2's tokenizer is only used from tiktoken's local cache; stand one in to check the numbers."""
    import tiktoken

    stand_in = tiktoken.Encoding("stand-in", pat_str=bpe.PATTERNS["gpt2"],
                                 mergeable_ranks={bytes([b]): b for b in range(256)}, special_tokens={})
    monkeypatch.setattr(tstats, "_gpt2_encoder", lambda: (stand_in, "stand-in"))
    root = trained.parent.parent
    cfg = config.load([f"paths.root={root}", "shard.val_fraction=0.25"])
    files, _, _ = tsample.training_sample(cfg)
    stats = tstats.compute_stats(bpe.load(trained), cfg, files)
    assert stats["gpt2"] == "stand-in"
    for part in (stats["val"], *stats["per_language"].values()):
        assert part["gpt2_bytes_per_token"] == pytest.approx(1.0, abs=1e-4)  # bytes only: one token per byte
        assert part["bytes_per_token"] > 1.0
