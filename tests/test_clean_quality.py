"""Each quality step with documents it must keep and must drop, in English and Chinese."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from pipeline.filters.steps import (
    C4Quality,
    FineWebQuality,
    GopherQuality,
    GopherRepetition,
    LanguageFilter,
    Normalize,
    PIIRedact,
    Reject,
    ResiliparseExtract,
)
from pipeline.filters.text import cjk_fraction, dedup_tokens, text_hash, token_table, words

EN = (
    "The quick brown fox jumps over the lazy dog near the river bank.\n"
    "It was one of the warmest days of the year, and the fox wanted to rest.\n"
    "Many animals came to the water to drink and to cool down in the shade.\n"
    "The dog watched them with interest but did not move from his place.\n"
    "Later that evening the wind changed and the air became cool and fresh.\n"
    "Everyone agreed that it had been a good day to be outside with friends."
)
ZH = (
    "今天的天气非常好，我们一家人决定去公园散步。公园里有很多人在锻炼身体，有的在跑步，有的在打太极拳。"
    "孩子们在草地上放风筝，笑声传得很远。我们在湖边找了一个安静的地方坐下来，一边吃水果一边聊天。"
    "妈妈说这样的周末是最幸福的时光。傍晚的时候，太阳慢慢落山了，天空变成了美丽的橙红色。"
    "我们依依不舍地离开了公园，心里想着下次还要再来。回家的路上，爸爸给我们讲了他小时候的故事，大家都听得很认真。"
)
ZH_LINES = ZH.replace("。", "。\n").strip()
ZH_SPAM = "\n".join(["欢迎光临本店，全场商品八折优惠，欢迎光临！"] * 12)
EN_SPAM = "\n".join(["Buy cheap watches now, best prices online today!"] * 12)


def doc(text: str) -> dict:
    return {"id": "x", "url": "u", "text": text}


def kept(step, text: str) -> bool:
    return not isinstance(step(doc(text)), Reject)


def reason(step, text: str) -> str | None:
    r = step(doc(text))
    return r.reason if isinstance(r, Reject) else None


# ------------------------------------------------------------------ tokenisation


def test_words_split_like_spacy_and_cjk_by_character():
    assert words("Don't stop... it's (really) fine, e.g. now!") == [
        "Don't", "stop", "...", "it's", "(", "really", ")", "fine", ",", "e", ".", "g", ".", "now", "!",
    ]  # fmt: skip
    assert words("我们在公园散步。") == ["我", "们", "在", "公", "园", "散", "步", "。"]
    assert words("Python 3.11 版本") == ["Python", "3", ".", "11", "版", "本"]
    assert cjk_fraction(ZH) > 0.8 and cjk_fraction(EN) == 0
    for text in (EN, ZH, "Don't 'quote' rock'n'roll __init__ x''y e.g. 😀😀 w\U0001d518rd", ""):
        table = token_table(text)  # the array form the Gopher steps use: same tokens
        toks = words(text)
        assert table.n == len(toks) and table.lens.tolist() == [len(t) for t in toks]
        assert len(set(table.hashes.tolist())) == len(set(toks))
        assert table.has_alpha.tolist() == [any(c.isalpha() for c in t) for t in toks]
        assert [table.hashes[i] == text_hash(t) for i, t in enumerate(toks)] == [True] * len(toks)
    assert dedup_tokens("Hello, World 42! snake_case 3.11") == ["hello", "world", "00", "snake_case", "0", "00"]


# ------------------------------------------------------------------ Gopher repetition


def reference_repetition(text: str, n_top=((2, 0.2), (3, 0.18), (4, 0.16)), n_dup=((5, 0.15), (6, 0.14))):
    """datatrove's GopherRepetitionFilter n-gram rules written plainly (strings, not hashes)."""
    ws = words(text)
    for n, frac in n_top:
        grams = [" ".join(ws[i : i + n]) for i in range(len(ws) - n + 1)]
        if grams:
            top, count = Counter(grams).most_common(1)[0]
            if len(top) * count / len(text) > frac:
                return f"top_{n}_gram"
    for n, frac in n_dup:
        seen, chars, i = set(), 0, 0
        while i < len(ws) - n + 1:
            g = "".join(ws[i : i + n])
            if g in seen:
                chars += len(g)
                i += n
            else:
                seen.add(g)
                i += 1
        if chars / len(text) > frac:
            return f"duplicated_{n}_n_grams"
    return None


def test_gopher_repetition_matches_the_reference_algorithm():
    rng = random.Random(0)
    vocab = EN.replace("\n", " ").split()
    step = GopherRepetition(dup_line_frac=None, dup_para_frac=None, dup_line_char_frac=None, dup_para_char_frac=None,
                            dup_n_grams=((5, 0.15), (6, 0.14)))  # fmt: skip
    outcomes = Counter()
    for trial in range(150):
        k = rng.choice([3, 8, 20, 60])  # small vocabularies repeat n-grams
        text = " ".join(rng.choice(vocab[:k]) for _ in range(rng.randrange(20, 300)))
        want = reference_repetition(text)
        assert reason(step, text) == want, (trial, text)
        outcomes[want] += 1
    assert outcomes[None] and len(outcomes) >= 3  # both kept and several rejection reasons were exercised


def test_gopher_repetition_keeps_prose_drops_spam():
    step = GopherRepetition()
    assert kept(step, EN) and kept(step, ZH) and kept(step, ZH_LINES)
    assert reason(step, EN_SPAM) == "dup_line_frac"
    assert reason(step, ZH_SPAM) == "dup_line_frac"
    para = EN + "\n\n" + EN + "\n\n" + EN
    assert reason(step, para) == "dup_para_frac"
    # Chinese repeated phrases inside one paragraph: character n-grams catch them
    zh_rep = "。".join(["这个产品真的非常好用推荐大家购买"] * 8) + "。" + ZH[:60]
    assert reason(step, zh_rep) in ("top_2_gram", "top_3_gram", "top_4_gram", "duplicated_5_n_grams")


# ------------------------------------------------------------------ Gopher quality


def test_gopher_quality_english_and_chinese():
    step = GopherQuality()
    assert kept(step, EN)
    assert kept(step, ZH)  # characters are words: no mean-word-length rule, Chinese stop words
    assert reason(step, "Short text with the word and.") == "gopher_short_doc"
    assert reason(step, "今天天气很好。") == "gopher_short_doc"
    no_stop = " ".join(["Compute quickly using alpha beta gamma delta values"] * 10)
    assert reason(step, no_stop) == "gopher_enough_stop_words"
    zh_no_stop = "苹果香蕉橘子葡萄西瓜草莓芒果菠萝樱桃柠檬" * 6
    assert reason(step, zh_no_stop) == "gopher_enough_stop_words"
    hashes = EN + " #tag" * 30
    assert reason(step, hashes) == "gopher_too_many_hashes"
    bullets = "\n".join(f"- the item number {i} and more" for i in range(60))
    assert reason(step, bullets) == "gopher_too_many_bullets"
    numbers = " ".join(str(i) for i in range(1000, 1200)) + " the and of"
    assert reason(step, numbers) == "gopher_below_alpha_threshold"
    assert reason(step, "the and " + " ".join(["internationalization"] * 60)) == "gopher_above_avg_threshold"


# ------------------------------------------------------------------ C4


def test_c4_english_and_chinese():
    step = C4Quality()
    out = step(doc("Home | Menu\n" + EN + "\nClick here\nAccept our privacy policy today please."))
    assert out["text"] == EN  # navigation, a line without punctuation and the policy line are gone
    assert reason(step, EN + "\nThis uses a {template} value here.") == "curly_bracket"
    assert reason(step, EN + "\nLorem ipsum dolor sit amet, consectetur.") == "lorem_ipsum"
    assert reason(step, "Only one sentence here.\nAnd another one.") == "too_few_sentences"
    assert kept(step, ZH) and kept(step, ZH_LINES)  # full-width stops end sentences, characters count as words
    assert step(doc("首页 | 登录\n" + ZH_LINES))["text"] == ZH_LINES
    assert reason(step, "首页\n产品介绍\n联系我们\n关于本站") == "too_few_sentences"


# ------------------------------------------------------------------ FineWeb


def test_fineweb_english_and_chinese():
    step = FineWebQuality()
    assert kept(step, EN) and kept(step, ZH) and kept(step, ZH_LINES)
    menu = "\n".join(["Home", "About us", "Products", "Contact", "Blog", "Careers"]) + "\n" + EN.split("\n")[0]
    assert reason(step, menu) == "short_line_ratio"
    assert (
        reason(step, "\n".join(["首页", "关于我们", "产品中心", "联系方式", "新闻"]) + "\n" + ZH_LINES.split("\n")[0])
        == "short_line_ratio"
    )
    no_punct = "\n".join(f"this line has many words but no final stop number {i}" for i in range(20))
    assert reason(step, no_punct) == "line_punct_ratio"
    assert reason(step, EN + "\n" + EN.split("\n")[2]) == "char_dup_ratio"


# ------------------------------------------------------------------ normalisation, language, PII, extraction


def test_normalize_repairs_mojibake_controls_and_whitespace():
    step = Normalize()
    out = step(doc("The caf\u00c3\u00a9 is \u00e2\u20ac\u0153open\u00e2\u20ac\x9d.\r\nx\x00y\u200b  \n\n\n\nnext"))
    assert out["text"] == "The caf\u00e9 is \u201copen\u201d.\nxy\n\nnext"
    assert step(doc("e\u0301 \u4e2d\u6587"))["text"] == "\u00e9 \u4e2d\u6587"  # NFC; Chinese untouched
    assert step(doc("    def f():\n        return 1"))["text"] == "    def f():\n        return 1"  # indentation kept
    assert reason(step, " \x00 \n ") == "empty"
    ascii_doc = doc("plain ascii & text")
    assert step(ascii_doc)["text"] == "plain ascii & text"  # HTML entities are not unescaped, ASCII skips ftfy


def test_language_filter_keeps_list_and_records_language():
    step = LanguageFilter(keep=["en", "zh"])
    assert step(doc(EN))["language"] == "en"
    assert step(doc(ZH))["language"] == "zh"
    fr = "Le renard brun rapide saute par-dessus le chien paresseux. Nous sommes allés au marché ce matin."
    assert reason(step, fr) == "language_fr"
    assert reason(LanguageFilter(keep=["en"]), ZH) == "language_zh"
    assert step(doc(EN.upper()))["language"] == "en"  # shouting is still English


def test_pii_redaction():
    step = PIIRedact()
    text = ("Mail jane.doe+news@example.org or call +1 415 555 0100. Server 8.8.8.8 and localhost 127.0.0.1, "
            "LAN 192.168.1.20. Version 3.11.4 released in 2023 with 1500 fixes.")  # fmt: skip
    out = step(doc(text))["text"]
    assert out == ("Mail <email> or call <phone>. Server <ip> and localhost 127.0.0.1, "
                   "LAN 192.168.1.20. Version 3.11.4 released in 2023 with 1500 fixes.")  # fmt: skip
    assert PIIRedact(phones=False)(doc("call 415 555 0100"))["text"] == "call 415 555 0100"
    zh = "请联系张三：zhangsan@example.cn，电话 +86 138 0013 8000。"
    assert step(doc(zh))["text"] == "请联系张三：<email>，电话 <phone>。"


def test_resiliparse_extract_keeps_title_and_language():
    page = (
        "<html lang='zh-CN'><head><title>公园散步</title></head><body><nav><a href='/'>首页</a></nav>"
        f"<article><h1>周末</h1><p>{ZH}</p></article><footer>版权所有</footer></body></html>"
    )
    out = ResiliparseExtract()({"html": page, "text": None})
    assert "公园" in out["text"] and out["title"] == "公园散步" and out["language"] == "zh"
    assert ResiliparseExtract()({"html": "", "text": None}) == Reject("no_content")


@pytest.mark.parametrize("text", [EN, ZH])
def test_web_profile_keeps_good_prose(text, tmp_path):
    from omegaconf import OmegaConf

    from pipeline.core.config import load
    from pipeline.filters.apply import apply_steps, build_steps

    cfg = load([f"paths.root={tmp_path}", "clean=web"])
    steps = build_steps(
        list(OmegaConf.to_container(cfg.clean.steps, resolve=True).values())[1:]
    )  # text documents: skip HTML extraction
    _, where, why = apply_steps(steps, doc(text), [])
    assert why == "", (where, why)
