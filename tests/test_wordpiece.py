"""Parity of rpo_jax.reward.wordpiece.BertTokenizer with transformers' BertTokenizer (ALIGN's tokenizer).

transformers >= 5 has one BERT tokenizer backed by HuggingFace ``tokenizers`` (``BertTokenizerFast``
is an alias of ``BertTokenizer``); both names are still checked. Vocabularies are made with
:func:`rpo_jax.reward.wordpiece.build_vocab` so that most words of the prompts are whole tokens, some
split into ``##`` pieces and some are [UNK].

A full sweep of all 1,112,064 code points through ``f"a{c}b {c}{c}X{c}Σ{c}"`` (normaliser +
pre-tokenizer, four do_lower_case / strip_accents settings; ~80 s, too slow for CI) against
transformers 5.24 / tokenizers 0.23 on Python 3.11 found 56 differences, all from Unicode versions:
55 code points unassigned in Python's Unicode 14 that Rust lowercases (e.g. U+A7CB, U+10D50..), and
U+11938 which Python's NFD decomposes and tokenizers' does not. ``test_code_point_sample``
re-checks every boundary of the character tables plus a random sample.
"""
import json
import os
import random
import subprocess
import sys
import unicodedata

import numpy as np
import pytest

from rpo_jax.reward import wordpiece
from rpo_jax.reward.wordpiece import ALIGN_MAX_LENGTH, BertTokenizer, TokenizerFileError, build_vocab, write_vocab

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LONG_PROMPT = (
    "a highly detailed photograph of a small fluffy [V] dog wearing a red knitted scarf, sitting on "
    "the grey dusty surface of the Moon, the Earth rising over the horizon, dramatic lighting, "
    "sharp focus, 8k, trending on artstation, by Greg Rutkowski and Alphonse Mucha, masterpiece, "
    "best quality, ultra realistic, cinematic composition, depth of field, bokeh, golden hour"
)
# Words the vocabulary is built from (the rest of PROMPTS is partly out of vocabulary).
VOCAB_TEXTS = [
    "a photo of sks dog", "a [V] dog on the Moon", "A PHOTO OF A DOG IN THE SNOW", LONG_PROMPT,
    "Hello, World! Is this a test? yes no maybe ok quoted double",
    "café naïve résumé Ångström Zoë façade São Paulo", "日本語の犬 中文提示", "ΟΔΟΣ Σ ς İstanbul ß",
]
EXTRA = ["##s", "##ing", "##ed", "run", "un", "##aff", "##able", "dog", "##gy", "photo", "##graph"]
PROMPTS = VOCAB_TEXTS + [
    "a photo of sks dogs running, unaffable doggy photographs",
    "Hello, World! Is this... a test?! (yes) [no] {maybe} -- ok; 'quoted' \"double\"",
    "3 dogs, 42 cats, 1999, 3.14159, 1,000,000 and 0x1F; 2nd 21st",
    "the dog's bone, don't, I'm, we're",
    "   extra   spaces  ",
    "tabs\tand\nnewlines\r\n\u00a0non-breaking\u3000ideographic\u2003em\x85nel\x0bvt\x0cff",
    "café naïve e\u0301 (decomposed) CAFÉ ÀÉÎÕÜ",
    "日本語の犬 中文提示 한국어 プロンプト 𠀀 〇",
    "emoji 😀👍🏽🐶🌕 ❤️",
    "",
    " ",
    "a [MASK] b [mask] [CLS]x[SEP][PAD] [UNK]unknown[V]",
    "control\x00chars\x1c\x7f\u200bzero\ufffdwidth\u00adsoft",
    "don’t “curly” ﬁ ligature Ｆｕｌｌｗｉｄｔｈ &amp; ½ ²",
    "x" * 100 + " " + "y" * 101 + " photo",
    LONG_PROMPT + " " + LONG_PROMPT,
]


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


def _make_folder(path, do_lower_case, **config):
    os.makedirs(path, exist_ok=True)
    write_vocab(build_vocab(VOCAB_TEXTS, extra=EXTRA, do_lower_case=do_lower_case), os.path.join(path, "vocab.txt"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"do_lower_case": do_lower_case, "tokenizer_class": "BertTokenizer", **config}, f)
    return str(path)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert_tokenizers")
    return {lower: _make_folder(root / f"lower_{lower}", lower) for lower in (True, False)}


@pytest.fixture(scope="module")
def hf(transformers, folders):
    """{(do_lower_case, class name): transformers tokenizer}."""
    return {(lower, kind): getattr(transformers, kind).from_pretrained(folders[lower])
            for lower in folders for kind in ("BertTokenizer", "BertTokenizerFast")}


@pytest.fixture(scope="module")
def ours(folders):
    return {lower: BertTokenizer.from_pretrained(folders[lower]) for lower in folders}


def _hf_batch(tok, texts, **kw):
    kw = {"padding": "max_length", "max_length": ALIGN_MAX_LENGTH, "truncation": True, **kw}
    enc = tok(list(texts), **kw)
    return {k: np.asarray(enc[k]) for k in ("input_ids", "attention_mask", "token_type_ids")}


def _assert_same(ours_out, theirs, texts, tok):
    for k in ("input_ids", "attention_mask", "token_type_ids"):
        assert ours_out[k].dtype == np.int32, k
        assert ours_out[k].shape == theirs[k].shape, (k, ours_out[k].shape, theirs[k].shape)
        for i, t in enumerate(texts):
            assert np.array_equal(ours_out[k][i], theirs[k][i]), (
                k, t, tok.convert_ids_to_tokens(ours_out["input_ids"][i].tolist()))


# ---------------------------------------------------------------- parity


def test_no_heavy_imports():
    """Only the ``tokenizers`` engine: no transformers / torch / jax."""
    code = ("import sys, rpo_jax.reward.wordpiece as w; t = w.BertTokenizer(w.build_vocab(['a dog'])); t('a dog'); "
            "bad = [m for m in ('transformers', 'torch', 'jax') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@pytest.mark.parametrize("lower", [True, False], ids=["uncased", "cased"])
def test_backend_matches_transformers(lower, hf, ours):
    """Our ``tokenizers`` pipeline is the one transformers builds, section by section."""
    theirs = json.loads(hf[lower, "BertTokenizer"].backend_tokenizer.to_str())
    mine = json.loads(ours[lower].backend.to_str())
    for section in ("normalizer", "pre_tokenizer", "model", "post_processor", "decoder", "added_tokens"):
        assert mine[section] == theirs[section], section
    assert mine["normalizer"]["lowercase"] is lower and mine["model"]["max_input_chars_per_word"] == 100


@pytest.mark.parametrize("lower", [True, False], ids=["uncased", "cased"])
@pytest.mark.parametrize("kind", ["BertTokenizer", "BertTokenizerFast"])
def test_ids_parity(lower, kind, hf, ours):
    tok, ref = ours[lower], hf[lower, kind]
    _assert_same(tok(PROMPTS), _hf_batch(ref, PROMPTS), PROMPTS, tok)
    for p in PROMPTS:
        assert tok.encode(p) == ref.encode(p), p
        assert tok.tokenize(p) == ref.tokenize(p), p
    assert tok.vocab_size == ref.vocab_size and len(tok) == len(ref)
    assert tok.get_vocab() == ref.get_vocab()
    for attr in ("pad_token_id", "unk_token_id", "cls_token_id", "sep_token_id", "mask_token_id"):
        assert getattr(tok, attr) == getattr(ref, attr), attr
    rows_with_unk = int((tok(PROMPTS)["input_ids"] == tok.unk_token_id).any(1).sum())
    assert rows_with_unk >= 3  # the comparison exercises [UNK]s, not only in-vocabulary words


@pytest.mark.parametrize("lower", [True, False], ids=["uncased", "cased"])
def test_truncation_and_padding(lower, hf, ours):
    tok, ref = ours[lower], hf[lower, "BertTokenizer"]
    for max_length in (2, 3, 8, 16, 64, 200):
        _assert_same(tok(PROMPTS, max_length=max_length), _hf_batch(ref, PROMPTS, max_length=max_length),
                     PROMPTS, tok)
    short = PROMPTS[:3]
    _assert_same(tok(short, padding="longest"), _hf_batch(ref, short, padding="longest"), short, tok)
    _assert_same(tok(short, padding=True, max_length=5), _hf_batch(ref, short, padding=True, max_length=5), short, tok)
    out = tok("a dog")
    assert {k: v.shape for k, v in out.items()} == {k: (1, 64) for k in ("input_ids", "attention_mask", "token_type_ids")}
    long_ids = tok.encode(LONG_PROMPT)
    assert len(long_ids) > 64
    row = tok([LONG_PROMPT])["input_ids"][0]
    assert row.tolist() == long_ids[:63] + [tok.sep_token_id]
    # Without truncation long rows stay whole (as AlignProcessor, which does not truncate).
    untruncated = tok([LONG_PROMPT, "a dog"], truncation=False)
    assert untruncated["input_ids"].shape == (2, len(long_ids))
    assert untruncated["input_ids"][0].tolist() == long_ids
    assert untruncated["attention_mask"][1].sum() == len(tok.encode("a dog"))
    theirs = _hf_batch(ref, [LONG_PROMPT], truncation=False)
    assert np.array_equal(tok(LONG_PROMPT, truncation=False)["input_ids"], theirs["input_ids"])
    with pytest.raises(ValueError, match="equal length"):
        tok(["a", "a dog on the moon"], padding=False)
    with pytest.raises(ValueError, match="max_length"):
        tok("a", max_length=1)
    with pytest.raises(TypeError):
        tok([3])


def test_align_processor_pads_to_64(transformers, folders, ours):
    """AlignProcessor's text defaults are padding="max_length", max_length=64: our __call__ default."""
    assert transformers.AlignProcessor.text_kwargs == {"padding": "max_length", "max_length": 64}
    ip_cls = getattr(transformers, "EfficientNetImageProcessorPil", None) or transformers.EfficientNetImageProcessor
    try:
        processor = transformers.AlignProcessor(image_processor=ip_cls(),
                                                tokenizer=transformers.BertTokenizer.from_pretrained(folders[True]))
    except Exception as e:  # pragma: no cover - optional image-processing dependencies
        pytest.skip(f"cannot build AlignProcessor here: {e}")
    tok = ours[True]
    fits = [p for p in PROMPTS if len(tok.encode(p)) <= 64]
    assert len(fits) >= len(PROMPTS) - 3
    enc = processor(text=fits)
    theirs = {k: np.asarray(enc[k]) for k in ("input_ids", "attention_mask", "token_type_ids")}
    _assert_same(tok(fits), theirs, fits, tok)
    # AlignProcessor does not truncate: a long prompt keeps all its tokens (truncation=False here).
    for p in PROMPTS:
        if len(tok.encode(p)) > 64:
            enc = processor(text=[p])
            assert len(enc["input_ids"][0]) > 64
            assert tok(p, truncation=False)["input_ids"][0].tolist() == list(enc["input_ids"][0])
            assert tok(p)["input_ids"].shape == (1, 64)


def test_special_tokens_in_text(hf, ours):
    """Special tokens are split out of the raw text, case-sensitively, even inside words."""
    tok, ref = ours[True], hf[True, "BertTokenizer"]
    for t in ["[MASK]", "a[MASK]b", "[mask]", "[MASK][MASK]", "[CLS] dog [SEP]", "[PAD]", "x[UNK]y",
              "[MAS K]", "[[MASK]]", "[V]", "[v]", "sks [V] dog"]:
        assert tok.encode(t) == ref.encode(t), t
    assert tok.tokenize("a[MASK]b") == ["a", "[MASK]", "b"]
    assert tok.tokenize("[V] dog") == ["[", "v", "]", "dog"]


def test_wordpiece_rules(hf, ours):
    tok, ref = ours[True], hf[True, "BertTokenizer"]
    assert tok.tokenize("unaffable dogs running") == ["un", "##aff", "##able", "dog", "##s", "run", "##n", "##ing"]
    # An unmatched piece makes the whole word [UNK]; more than 100 characters too.
    for t in ["x" * 99, "x" * 100, "x" * 101, "dog" * 34, "dogé", "photograph", "photographed", "q€z"]:
        assert tok.tokenize(t) == ref.tokenize(t), t
    assert tok.tokenize("x" * 101) == ["[UNK]"] and len(tok.tokenize("x" * 100)) == 100


@pytest.mark.parametrize("lower", [True, False], ids=["uncased", "cased"])
def test_decode(lower, hf, ours):
    tok, ref = ours[lower], hf[lower, "BertTokenizer"]
    extra = ["dog . cat , really ? yes ! it ' s", "do not", "it's isn't i'm", "##s dog"]
    for p in PROMPTS + extra:
        ids = tok.encode(p)
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), (p, skip)
            for clean in (False, True):
                assert tok.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=clean) == \
                    ref.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=clean), (p, skip, clean)
    batch = tok(PROMPTS[:4])["input_ids"]
    assert tok.batch_decode(batch, skip_special_tokens=True) == ref.batch_decode(batch.tolist(), skip_special_tokens=True)
    ids = [5, 6, tok.vocab_size + 10, 7]  # an unknown id is skipped
    assert tok.decode(ids) == ref.decode(ids)


# ---------------------------------------------------------------- character classes


def _sample_code_points(seed=0, n=4000):
    """Every code point where the Unicode category changes below U+3100, plus a random sample."""
    cps = {cp for cp in range(1, 0x3100) if unicodedata.category(chr(cp)) != unicodedata.category(chr(cp - 1))}
    cps.update(range(0, 0x250))
    cps.update((0x4E00, 0x9FFF, 0x3400, 0x20000, 0x2A6DF, 0xF900, 0xFAFF, 0x2F800, 0x2FA1F, 0xFFFD, 0xFEFF))
    rng = random.Random(seed)
    cps.update(rng.randrange(0, 0x30000) for _ in range(n))
    cps.update(rng.randrange(0x30000, 0x110000) for _ in range(n // 8))
    return sorted(cp for cp in cps if not 0xD800 <= cp <= 0xDFFF)


@pytest.mark.parametrize("cfg", [dict(do_lower_case=True), dict(do_lower_case=False),
                                 dict(do_lower_case=False, strip_accents=True),
                                 dict(do_lower_case=True, strip_accents=False, tokenize_chinese_chars=False)],
                         ids=["uncased", "cased", "cased_strip", "uncased_keep_accents_no_cjk"])
def test_code_point_sample(cfg, transformers, tmp_path):
    """Normalisation (control characters, whitespace, CJK, accents, case) and punctuation splitting,
    code point by code point, against transformers with the same config."""
    folder = _make_folder(tmp_path / "cp", **cfg)
    tok, ref = BertTokenizer.from_pretrained(folder), transformers.BertTokenizer.from_pretrained(folder)
    texts = [f"a{chr(cp)}b {chr(cp)}{chr(cp)}X{chr(cp)}Σ{chr(cp)}" for cp in _sample_code_points()]
    norm, pre = ref.backend_tokenizer.normalizer, ref.backend_tokenizer.pre_tokenizer
    mine = [tok.backend.pre_tokenizer.pre_tokenize_str(tok.backend.normalizer.normalize_str(t)) for t in texts]
    assert [pre.pre_tokenize_str(norm.normalize_str(t)) for t in texts] == mine
    assert [tok.encode(t) for t in texts] == [ref.encode(t) for t in texts]
    assert [tok.tokenize(t) for t in texts] == [ref.tokenize(t) for t in texts]


# ---------------------------------------------------------------- files


def test_save_pretrained_round_trip(transformers, ours, tmp_path):
    for lower, tok in ours.items():
        out = tmp_path / f"saved_{lower}"
        paths = tok.save_pretrained(out)
        assert sorted(os.path.basename(p) for p in paths) == ["special_tokens_map.json", "tokenizer_config.json", "vocab.txt"]
        for kind in ("BertTokenizer", "BertTokenizerFast"):
            ref = getattr(transformers, kind).from_pretrained(str(out))
            _assert_same(tok(PROMPTS), _hf_batch(ref, PROMPTS), PROMPTS, tok)
            assert ref.do_lower_case == lower and ref.model_max_length == tok.model_max_length
        again = BertTokenizer.from_pretrained(out)
        assert again.get_vocab() == tok.get_vocab() and again.do_lower_case == lower
        assert np.array_equal(again(PROMPTS)["input_ids"], tok(PROMPTS)["input_ids"])
        # transformers 5 saves only tokenizer.json + tokenizer_config.json: we read that too.
        hf_out = tmp_path / f"hf_saved_{lower}"
        transformers.BertTokenizer.from_pretrained(str(out)).save_pretrained(str(hf_out))
        assert not (hf_out / "vocab.txt").exists()
        from_hf = BertTokenizer.from_pretrained(hf_out)
        assert from_hf.get_vocab() == tok.get_vocab() and from_hf.do_lower_case == lower
        assert np.array_equal(from_hf(PROMPTS)["input_ids"], tok(PROMPTS)["input_ids"])


def test_config_options(transformers, tmp_path):
    """strip_accents / tokenize_chinese_chars / special tokens from tokenizer_config.json."""
    texts = PROMPTS[:12]
    for i, cfg in enumerate([
        dict(do_lower_case=True, strip_accents=False),
        dict(do_lower_case=False, strip_accents=True),
        dict(do_lower_case=True, tokenize_chinese_chars=False),
        dict(do_lower_case=True, mask_token="[V]", model_max_length=77),
        dict(do_lower_case=True, clean_up_tokenization_spaces=True),
    ]):
        folder = _make_folder(tmp_path / f"c{i}", **cfg)
        tok, ref = BertTokenizer.from_pretrained(folder), transformers.BertTokenizer.from_pretrained(folder)
        _assert_same(tok(texts), _hf_batch(ref, texts), texts, tok)
        ids = tok.encode(texts[4])
        assert tok.decode(ids) == ref.decode(ids), cfg
    assert tok.clean_up_tokenization_spaces
    # Keyword overrides win over the files.
    folder = _make_folder(tmp_path / "ov", True)
    tok = BertTokenizer.from_pretrained(folder, do_lower_case=False)
    ref = transformers.BertTokenizer.from_pretrained(folder, do_lower_case=False)
    _assert_same(tok(texts), _hf_batch(ref, texts), texts, tok)
    with pytest.raises(TypeError, match="unexpected"):
        BertTokenizer.from_pretrained(folder, bogus=1)


def test_added_tokens(transformers, tmp_path):
    """added_tokens_decoder entries: raw ([V], <Spec>) and normalized (SksTok) ones, saved and reloaded."""
    folder = _make_folder(tmp_path / "added", True)
    n = len((tmp_path / "added" / "vocab.txt").read_text().splitlines())

    def entry(content, normalized, special):
        return {"content": content, "lstrip": False, "rstrip": False, "single_word": False,
                "normalized": normalized, "special": special}

    cfg = {"do_lower_case": True, "added_tokens_decoder": {
        **{str(i): entry(t, False, True) for i, t in enumerate(wordpiece.SPECIAL_TOKENS)},
        str(n): entry("[V]", False, False), str(n + 1): entry("SksTok", True, False),
        str(n + 2): entry("<Spec>", False, True)}}
    (tmp_path / "added" / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok, ref = BertTokenizer.from_pretrained(folder), transformers.BertTokenizer.from_pretrained(folder)
    texts = ["a [V] dog", "a [v] dog", "sKsToK dog SksTok sks", "x<Spec>y <spec>", "[V][V]", "[V] [MASK]"]
    _assert_same(tok(texts), _hf_batch(ref, texts), texts, tok)
    assert tok.get_vocab() == ref.get_vocab() and len(tok) == len(ref)
    for t in texts:
        assert tok.tokenize(t) == ref.tokenize(t), t
    ids = [2, n, n + 1, n + 2, 5, 3]
    for skip in (False, True):
        assert tok.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
    tok.save_pretrained(tmp_path / "saved")
    for again in (BertTokenizer.from_pretrained(tmp_path / "saved"),
                  transformers.BertTokenizer.from_pretrained(str(tmp_path / "saved"))):
        assert [again.encode(t) for t in texts] == [ref.encode(t) for t in texts]


def test_vocab_file_quirks(transformers, tmp_path):
    """CRLF endings, trailing spaces, a repeated token, special tokens missing from the vocab."""
    words = build_vocab(["a photo of a dog"])
    words.remove("[MASK]")
    text = "\r\n".join(words[:8] + ["dog  ", "dog"] + words[8:]) + "\r\n"
    folder = tmp_path / "quirks"
    folder.mkdir()
    (folder / "vocab.txt").write_bytes(text.encode())
    tok, ref = BertTokenizer.from_pretrained(folder), transformers.BertTokenizer.from_pretrained(str(folder))
    assert tok.get_vocab() == ref.get_vocab()
    assert tok.vocab_size == ref.vocab_size and len(tok) == len(ref)
    assert tok.mask_token_id == ref.mask_token_id
    texts = ["a photo of a dog", "a [MASK] dog", "dog dog"]
    _assert_same(tok(texts), _hf_batch(ref, texts), texts, tok)
    for t in texts:
        assert tok.decode(tok.encode(t)) == ref.decode(ref.encode(t))
    with pytest.raises(ValueError, match="gaps"):
        tok.save_pretrained(tmp_path / "cannot")


def test_missing_and_bad_files(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError) as e:
        BertTokenizer.from_pretrained(empty)
    assert str(empty / "vocab.txt") in str(e.value)
    with pytest.raises(FileNotFoundError, match="tokenizer folder not found"):
        BertTokenizer.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError) as e:
        wordpiece.read_vocab(tmp_path / "nope.txt")
    assert str(tmp_path / "nope.txt") in str(e.value)
    bad = tmp_path / "bad"
    _make_folder(bad, True)
    (bad / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TokenizerFileError) as e:
        BertTokenizer.from_pretrained(bad)
    assert str(bad / "tokenizer_config.json") in str(e.value)
    (bad / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": "yes"}))
    with pytest.raises(TokenizerFileError, match="do_lower_case"):
        BertTokenizer.from_pretrained(bad)
    (bad / "tokenizer_config.json").write_text("{}")
    (bad / "vocab.txt").write_bytes(b"[PAD]\n\xff\xfe\n")
    with pytest.raises(TokenizerFileError) as e:
        BertTokenizer.from_pretrained(bad)
    assert str(bad / "vocab.txt") in str(e.value)
    os.remove(bad / "vocab.txt")
    (bad / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": {}}}))
    with pytest.raises(TokenizerFileError, match="WordPiece"):
        BertTokenizer.from_pretrained(bad)
    # A model root with a tokenizer/ subfolder is accepted.
    root = tmp_path / "root"
    _make_folder(root / "tokenizer", True)
    assert BertTokenizer.from_pretrained(root).vocab_size == BertTokenizer.from_pretrained(root / "tokenizer").vocab_size


# ---------------------------------------------------------------- vocab helpers


def test_build_and_write_vocab(tmp_path):
    words = build_vocab(["A photo of sks dog", "Café 日本"], extra=["##ing", "dog"])
    assert words[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert len(words) == len(set(words))
    for w in ("photo", "sks", "dog", "cafe", "a", "##a", "日", "##日", "##ing", "~", "##~"):
        assert w in words, w
    assert "A" not in words and "café" not in words  # uncased vocabulary: normalised words
    assert words.index("photo") > words.index("##z")  # characters, continuations, then words
    cased = build_vocab(["A photo of Café"], do_lower_case=False, ascii_chars=False)
    assert "Café" in cased and "A" in cased and "~" not in cased
    path = write_vocab(words, tmp_path / "vocab.txt")
    assert wordpiece.read_vocab(path) == {w: i for i, w in enumerate(words)}
    tok = BertTokenizer.from_pretrained(tmp_path)
    # Any ASCII text tokenizes without [UNK] (every printable character and its ## form is in).
    ascii_text = "".join(map(chr, range(32, 127))) + " Zebra-crossing_42!"
    assert tok.unk_token_id not in tok.encode(ascii_text)
    assert tok.tokenize("sks dog") == ["sks", "dog"]
    assert BertTokenizer(words).get_vocab() == tok.get_vocab()
    for bad in (["a", "a"], ["a\nb"], ["a "], [""]):
        with pytest.raises(ValueError):
            write_vocab(bad, tmp_path / "bad.txt")
    with pytest.raises(ValueError, match="extra token"):
        build_vocab(["a dog"], extra=["dog "])
