"""Parity of rpo_jax.sd.tokenizer.CLIPTokenizer with transformers' CLIP tokenizer.

transformers >= 5 has one CLIP tokenizer (tokenizers-backed; ``CLIPTokenizerFast`` is an alias of
``CLIPTokenizer``), both classes are still checked. Reference folders mimic the ``tokenizer/``
folders of SD 1.5 (pad ``<|endoftext|>``) and SD 2.x (pad ``!`` from special_tokens_map.json) on
the Hub: legacy tokenizer_config.json with ``__type: AddedToken`` dicts, ``normalized: true``.

A full sweep of all 1,112,064 code points (too slow for CI, ~2.5 min) found no difference for any
code point assigned in Python 3.11's Unicode 14; ``test_code_point_sample`` re-checks a sample.
"""
import gzip
import json
import os
import random
import shutil
import subprocess
import sys
import unicodedata

import numpy as np
import pytest

from tokenizers.pre_tokenizers import ByteLevel

from rpo_jax.sd.tokenizer import ASSETS_DIR, CLIPTokenizer, TokenizerFileError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PADS = ["<|endoftext|>", "!"]

LONG_PROMPT = (
    "a highly detailed photograph of a small fluffy [V] dog wearing a red knitted scarf, sitting on "
    "the grey dusty surface of the Moon, the Earth rising over the horizon, dramatic lighting, "
    "sharp focus, 8k, trending on artstation, by Greg Rutkowski and Alphonse Mucha, masterpiece, "
    "best quality, ultra realistic, cinematic composition, depth of field, bokeh, golden hour, "
    "volumetric fog, octane render"
)
PROMPTS = [
    "a photo of sks dog",
    "a [V] dog on the Moon",
    "A PHOTO OF A DOG IN THE SNOW",
    "Hello, World! Is this... a test?! (yes) [no] {maybe} -- ok; 'quoted' \"double\"",
    "hi!! wow!!! !leading and trailing! ! !",
    "3 dogs, 42 cats, 1999, 3.14159, 1,000,000 and 0x1F; 2nd 21st",
    "the dog's bone, the cats' toys, don't, I'm, we're, they've, you'll, he'd, DOG'S, It'S",
    "   extra   spaces  ",
    "tabs\tand\nnewlines\r\n\u00a0non-breaking\u3000ideographic\u2003em\x85nel",
    "café naïve résumé Ångström Zoë façade São Paulo e\u0301 (decomposed)",
    "日本語の犬 中文提示 한국어 プロンプト",
    "ΟΔΟΣ Σ ς İstanbul ß ẞ",
    "emoji 😀👍🏽🐶🌕 ❤️ 👨‍👩‍👧",
    "",
    " ",
    "<|startoftext|>a dog<|endoftext|> and <|ENDOFTEXT|>",
    "control\x00chars\x1c\x7f\u200bzero-width",
    "don’t “curly” ﬁ ligature Ｆｕｌｌｗｉｄｔｈ &amp;",
    LONG_PROMPT,
    LONG_PROMPT + " " + LONG_PROMPT,
]


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


def _added(content):
    return {"content": content, "single_word": False, "lstrip": False, "rstrip": False, "normalized": True}


def _hub_like_folder(path, pad_token):
    """A ``tokenizer/`` folder laid out like SD 1.5 / SD 2.x on the Hub (legacy config files)."""
    os.makedirs(path, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(ASSETS_DIR, name), path)
    config = {
        "errors": "replace",
        "unk_token": {**_added("<|endoftext|>"), "__type": "AddedToken"},
        "bos_token": {**_added("<|startoftext|>"), "__type": "AddedToken"},
        "eos_token": {**_added("<|endoftext|>"), "__type": "AddedToken"},
        "pad_token": "<|endoftext|>",
        "add_prefix_space": False,
        "do_lower_case": True,
        "model_max_length": 77,
        "name_or_path": "openai/clip-vit-large-patch14",
        "special_tokens_map_file": "./special_tokens_map.json",
        "tokenizer_class": "CLIPTokenizer",
    }
    special_map = {
        "bos_token": _added("<|startoftext|>"),
        "eos_token": _added("<|endoftext|>"),
        "unk_token": _added("<|endoftext|>"),
        "pad_token": pad_token,
    }
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    with open(os.path.join(path, "special_tokens_map.json"), "w") as f:
        json.dump(special_map, f)
    return str(path)


@pytest.fixture(scope="module")
def hub_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub_tokenizers")
    return {pad: _hub_like_folder(root / ("sd15" if pad == "<|endoftext|>" else "sd21"), pad) for pad in PADS}


@pytest.fixture(scope="module")
def hf_tokenizers(transformers, hub_folders):
    """{(pad, kind): transformers tokenizer} for kind in slow / fast / files (constructor from the asset files)."""
    out = {}
    for pad in PADS:
        out[pad, "slow"] = transformers.CLIPTokenizer.from_pretrained(hub_folders[pad])
        out[pad, "fast"] = transformers.CLIPTokenizerFast.from_pretrained(hub_folders[pad])
        out[pad, "files"] = transformers.CLIPTokenizer(
            os.path.join(ASSETS_DIR, "vocab.json"), os.path.join(ASSETS_DIR, "merges.txt"),
            pad_token=pad, model_max_length=77,
        )
    return out


@pytest.fixture(scope="module")
def ours():
    return {pad: CLIPTokenizer.default(pad_token=pad) for pad in PADS}


def _raw_backend(hf):
    """A copy of the tokenizers backend without the padding/truncation transformers leaves set."""
    from tokenizers import Tokenizer

    be = Tokenizer.from_str(hf.backend_tokenizer.to_str())
    be.no_padding()
    be.no_truncation()
    return be


def _hf_batch(tok, texts, max_length=77):
    enc = tok(list(texts), padding="max_length", max_length=max_length, truncation=True)
    return np.asarray(enc["input_ids"]), np.asarray(enc["attention_mask"])


# ---------------------------------------------------------------- assets


def test_assets_layout():
    with open(os.path.join(ASSETS_DIR, "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    with open(os.path.join(ASSETS_DIR, "merges.txt"), encoding="utf-8") as f:
        lines = f.read().split("\n")
    assert len(vocab) == 49408 and sorted(vocab.values()) == list(range(49408))
    assert list(vocab)[:3] == ["!", '"', "#"] and list(vocab)[256] == "!</w>"
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert lines[0] == "#version: 0.2" and lines[1] == "i n" and lines[-1] == ""
    merges = lines[1:-1]
    assert len(merges) == 48894 and merges[-1] == "jeky ll</w>"
    units = sorted(ByteLevel.alphabet())  # the 256 byte-level symbols; sorted = GPT-2's byte order
    assert list(vocab)[:512] == units + [u + "</w>" for u in units]
    assert [m.replace(" ", "") for m in merges] == list(vocab)[512:49406]
    for name in ("LICENSE", "README.md"):
        assert os.path.isfile(os.path.join(ASSETS_DIR, name))


def test_make_clip_vocab_script(tmp_path):
    """The generator on a synthetic .gz (and on the real one when RPO_CLIP_BPE_GZ points to it)."""
    sys.path.insert(0, os.path.join(ROOT, "launch"))
    try:
        import make_clip_vocab
    finally:
        sys.path.pop(0)
    fake = ["#version: fake header"] + [f"t{i} x</w>" for i in range(48894)] + ["extra merge", ""]
    gz = tmp_path / "fake.txt.gz"
    with gzip.open(gz, "wb") as f:
        f.write("\n".join(fake).encode())
    assert make_clip_vocab.main([str(gz), str(tmp_path / "out")]) == 0
    vocab = json.loads((tmp_path / "out" / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 49408 and vocab["t0x</w>"] == 512 and vocab["<|endoftext|>"] == 49407
    assert "extramerge" not in vocab
    merges = (tmp_path / "out" / "merges.txt").read_text(encoding="utf-8").split("\n")
    assert merges[0] == "#version: 0.2" and merges[1] == "t0 x</w>" and len(merges) == 48896
    real = os.environ.get("RPO_CLIP_BPE_GZ")
    if real:
        make_clip_vocab.main([real, str(tmp_path / "real")])
        for name in ("vocab.json", "merges.txt"):
            with open(os.path.join(ASSETS_DIR, name), "rb") as a, open(tmp_path / "real" / name, "rb") as b:
                assert a.read() == b.read(), name


def test_no_heavy_imports():
    """Only the ``tokenizers`` engine: no transformers / torch / jax."""
    code = "import sys, rpo_jax.sd.tokenizer as t; t.CLIPTokenizer.default()('a dog'); " \
           "bad = [m for m in ('transformers', 'torch', 'jax') if m in sys.modules]; " \
           "assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# ---------------------------------------------------------------- parity


@pytest.mark.parametrize("pad", PADS)
@pytest.mark.parametrize("kind", ["slow", "fast", "files"])
def test_ids_parity(pad, kind, hf_tokenizers, ours, hub_folders):
    """Ours (packaged default and loaded from the Hub-like folder) vs transformers."""
    hf = hf_tokenizers[pad, kind]
    prompts = PROMPTS
    if kind == "files":
        # The bare constructor makes bos/eos plain (normalized=False) special tokens, whereas the
        # Hub folders (and CLIPTokenizer.default) mark them normalized: only literal upper-case
        # "<|ENDOFTEXT|>" in a prompt tells them apart.
        prompts = [p for p in PROMPTS if "<|" not in p]
    ref_ids, ref_mask = _hf_batch(hf, prompts)
    for tok in (ours[pad], CLIPTokenizer.from_pretrained(hub_folders[pad])):
        out = tok(prompts)
        assert out["input_ids"].dtype == np.int32 and out["attention_mask"].dtype == np.int32
        assert out["input_ids"].shape == (len(prompts), 77)
        for i, p in enumerate(prompts):
            assert out["input_ids"][i].tolist() == ref_ids[i].tolist(), p
            assert out["attention_mask"][i].tolist() == ref_mask[i].tolist(), p
        assert tok.pad_token_id == hf.pad_token_id == (49407 if pad == "<|endoftext|>" else 0)
        assert (tok.bos_token_id, tok.eos_token_id) == (hf.bos_token_id, hf.eos_token_id) == (49406, 49407)
        assert tok.model_max_length == 77 and tok.vocab_size == len(hf) == 49408
        # Unpadded encode == transformers without padding/truncation.
        for p in prompts[:-2]:
            assert tok.encode(p) == hf(p)["input_ids"], p


@pytest.mark.parametrize("pad", PADS)
def test_backend_matches_transformers(pad, ours, hf_tokenizers, hub_folders):
    """Our ``tokenizers`` pipeline is the one transformers builds from the Hub folder, section by section."""
    theirs = json.loads(hf_tokenizers[pad, "fast"].backend_tokenizer.to_str())
    for tok in (ours[pad], CLIPTokenizer.from_pretrained(hub_folders[pad])):
        mine = json.loads(tok.backend.to_str())
        for section in ("normalizer", "pre_tokenizer", "model", "post_processor", "decoder", "added_tokens"):
            assert mine[section] == theirs[section], section


@pytest.mark.parametrize("pad", PADS)
def test_default_equals_hub_folder(pad, ours, hub_folders):
    loaded = CLIPTokenizer.from_pretrained(hub_folders[pad])
    assert ours[pad](PROMPTS)["input_ids"].tolist() == loaded(PROMPTS)["input_ids"].tolist()
    assert ours[pad].added_tokens == loaded.added_tokens


def test_truncation_and_padding(ours, hf_tokenizers):
    tok = ours["<|endoftext|>"]
    full = tok.encode(LONG_PROMPT + " " + LONG_PROMPT)
    assert len(full) > 77
    out = tok([LONG_PROMPT + " " + LONG_PROMPT, "a dog"])
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids[0].tolist() == full[:76] + [49407] and mask[0].all()
    assert ids[1, :4].tolist() == [49406, 320, 1929, 49407] and mask[1].sum() == 4
    assert (ids[1, 4:] == 49407).all()
    assert (ours["!"]("a dog")["input_ids"][0, 4:] == 0).all()
    # Other lengths / padding modes, against transformers.
    hf = hf_tokenizers["<|endoftext|>", "slow"]
    for L in (2, 5, 16):
        assert tok(PROMPTS, max_length=L)["input_ids"].tolist() == _hf_batch(hf, PROMPTS, L)[0].tolist()
    longest = tok(["a dog", "a photo of a dog"], padding="longest")
    ref = hf(["a dog", "a photo of a dog"], padding="longest")
    assert longest["input_ids"].tolist() == ref["input_ids"]
    assert longest["attention_mask"].tolist() == ref["attention_mask"]
    assert tok("a dog", padding=False)["input_ids"].shape == (1, 4)
    with pytest.raises(ValueError):
        tok(LONG_PROMPT, truncation=False)
    with pytest.raises(ValueError):
        tok(["a", "a dog"], padding=False)


def test_pad_bang_splits_exclamation_like_transformers(ours):
    # SD 2.x quirk reproduced from transformers: the pad token "!" is a special token, so it is
    # split out of the text (id 0) instead of being merged by BPE ("!!</w>" = 748).
    assert ours["!"].encode("hi!!") == [49406, 1883, 0, 0, 49407]
    assert ours["<|endoftext|>"].encode("hi!!") == [49406, 1883, 748, 49407]


def test_code_point_sample(transformers, hf_tokenizers, ours):
    rng = random.Random(0)
    cps = list(range(0x250)) + list(range(0x370, 0x530)) + list(range(0x2000, 0x2070)) + list(range(0x3000, 0x3040))
    cps += rng.sample(range(0x110000), 4000)
    cps = [c for c in cps if not 0xD800 <= c <= 0xDFFF and unicodedata.category(chr(c)) != "Cn"]
    texts = [f"a{chr(c)}b {chr(c)}{chr(c)}1{chr(c)}X{chr(c)}Σ{chr(c)}" for c in cps]
    hf = _raw_backend(hf_tokenizers["!", "slow"])
    ref = [e.ids for e in hf.encode_batch(texts)]
    tok = ours["!"]
    bad = [hex(c) for c, t, r in zip(cps, texts, ref) if tok.encode(t) != r]
    assert not bad


def test_bpe_words_sample(hf_tokenizers, ours):
    """Vocabulary entries glued together exercise many merge paths."""
    rng = random.Random(1)
    with open(os.path.join(ASSETS_DIR, "vocab.json"), encoding="utf-8") as f:
        words = [w.replace("</w>", "") for w in json.load(f) if w.isascii() and w.replace("</w>", "").isalpha()]
    texts = ["".join(rng.choice(words) for _ in range(rng.randint(1, 3))) for _ in range(3000)]
    texts += ["".join(rng.choice("ab'!?.-_01 Éé日😀") for _ in range(rng.randint(1, 30))) for _ in range(1000)]
    hf = _raw_backend(hf_tokenizers["<|endoftext|>", "fast"])
    ref = [e.ids for e in hf.encode_batch(texts)]
    tok = ours["<|endoftext|>"]
    assert [t for t, r in zip(texts, ref) if tok.encode(t) != r] == []


@pytest.mark.parametrize("pad", PADS)
def test_decode(pad, ours, hf_tokenizers):
    tok, hf = ours[pad], hf_tokenizers[pad, "slow"]
    for p in PROMPTS:
        ids = tok(p)["input_ids"][0]
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids.tolist(), skip_special_tokens=skip), p
    assert tok.batch_decode(tok(["a dog", "a cat"])["input_ids"], skip_special_tokens=True) == ["a dog", "a cat"]
    assert tok.tokenize("a dog's") == ["a</w>", "dog</w>", "'s</w>"]


# ---------------------------------------------------------------- save / load


@pytest.mark.parametrize("pad", PADS)
def test_save_pretrained_round_trip(pad, transformers, ours, tmp_path):
    tok = ours[pad]
    paths = tok.save_pretrained(tmp_path)
    assert sorted(os.path.basename(p) for p in paths) == [
        "merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
    for name in ("vocab.json", "merges.txt"):  # the assets are in save_pretrained's format
        with open(os.path.join(ASSETS_DIR, name), "rb") as a, open(tmp_path / name, "rb") as b:
            assert a.read() == b.read(), name
    expected = tok(PROMPTS)
    reloaded = CLIPTokenizer.from_pretrained(tmp_path)
    for cls in (transformers.CLIPTokenizer, transformers.CLIPTokenizerFast):
        hf = cls.from_pretrained(str(tmp_path))
        assert hf.model_max_length == 77 and hf.pad_token == pad
        ids, mask = _hf_batch(hf, PROMPTS, max_length=hf.model_max_length)
        assert ids.tolist() == expected["input_ids"].tolist()
        assert mask.tolist() == expected["attention_mask"].tolist()
    assert reloaded(PROMPTS)["input_ids"].tolist() == expected["input_ids"].tolist()
    assert (reloaded.pad_token, reloaded.model_max_length) == (pad, 77)


def test_from_pretrained_variants(transformers, hub_folders, tmp_path):
    # Diffusers model root with a tokenizer/ subfolder; keyword override like transformers'.
    root = tmp_path / "model"
    shutil.copytree(hub_folders["!"], root / "tokenizer")
    assert CLIPTokenizer.from_pretrained(root).pad_token == "!"
    assert CLIPTokenizer.from_pretrained(root, subfolder="tokenizer").pad_token_id == 0
    tok = CLIPTokenizer.from_pretrained(root / "tokenizer", pad_token="<|endoftext|>")
    hf = transformers.CLIPTokenizer.from_pretrained(str(root / "tokenizer"), pad_token="<|endoftext|>")
    assert tok.pad_token_id == hf.pad_token_id == 49407
    assert tok("hi!!")["input_ids"].tolist() == [hf("hi!!", padding="max_length")["input_ids"]]
    # Pad given as a {"content": ...} dict in tokenizer_config.json, no special_tokens_map.json.
    d = tmp_path / "dictpad"
    d.mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(ASSETS_DIR, name), d)
    (d / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77, "pad_token": {"content": "!"}}))
    assert CLIPTokenizer.from_pretrained(d).pad_token_id == 0
    # A transformers 5.x save (tokenizer.json + tokenizer_config.json, no vocab.json/merges.txt).
    saved = tmp_path / "hf_saved"
    transformers.CLIPTokenizer.from_pretrained(hub_folders["!"]).save_pretrained(str(saved))
    if not (saved / "vocab.json").exists():
        assert (saved / "tokenizer.json").exists()
    hf = transformers.CLIPTokenizer.from_pretrained(str(saved))
    tok = CLIPTokenizer.from_pretrained(saved)
    assert tok(PROMPTS)["input_ids"].tolist() == _hf_batch(hf, PROMPTS)[0].tolist()


def test_missing_and_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        CLIPTokenizer.from_pretrained(tmp_path / "nope")
    d = tmp_path / "tok"
    d.mkdir()
    shutil.copy(os.path.join(ASSETS_DIR, "merges.txt"), d)
    with pytest.raises(FileNotFoundError) as e:
        CLIPTokenizer.from_pretrained(d)
    assert str(d / "vocab.json") in str(e.value)
    (d / "vocab.json").write_text("{not json")
    with pytest.raises(TokenizerFileError) as e:
        CLIPTokenizer.from_pretrained(d)
    assert str(d / "vocab.json") in str(e.value)
    shutil.copy(os.path.join(ASSETS_DIR, "vocab.json"), d)
    (d / "tokenizer_config.json").write_text('{"model_max_length": 77,')
    with pytest.raises(ValueError) as e:
        CLIPTokenizer.from_pretrained(d)
    assert str(d / "tokenizer_config.json") in str(e.value)
    os.remove(d / "tokenizer_config.json")
    (d / "special_tokens_map.json").write_text('{"pad_token": 3}')
    with pytest.raises(ValueError, match="pad_token"):
        CLIPTokenizer.from_pretrained(d)
    os.remove(d / "special_tokens_map.json")
    os.remove(d / "merges.txt")
    with pytest.raises(FileNotFoundError) as e:
        CLIPTokenizer.from_pretrained(d)
    assert str(d / "merges.txt") in str(e.value)


def _d(content, normalized):
    return {"content": content, "single_word": False, "lstrip": False, "rstrip": False, "normalized": normalized}


SPECIAL_CONFIGS = {
    # special_tokens_map.json overrides; for a string shared by several special tokens the last
    # of (bos, eos, unk, pad) decides whether it is matched before or after lowercasing.
    "eos_normalized_unk_plain": ({"model_max_length": 77}, {
        "bos_token": _d("<|startoftext|>", True), "eos_token": _d("<|endoftext|>", True),
        "unk_token": "<|endoftext|>", "pad_token": "!"}),
    "eos_plain_unk_normalized": ({"model_max_length": 77}, {
        "bos_token": _d("<|startoftext|>", False), "eos_token": "<|endoftext|>",
        "unk_token": _d("<|endoftext|>", True), "pad_token": "!"}),
    # added_tokens_decoder present: special_tokens_map.json is ignored.
    "added_tokens_decoder": ({
        "model_max_length": 77, "pad_token": "!", "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "added_tokens_decoder": {"0": {**_d("!", True), "special": True},
                                 "49406": {**_d("<|startoftext|>", False), "special": True},
                                 "49407": {**_d("<|endoftext|>", True), "special": True}}},
        {"pad_token": "<|endoftext|>"}),
    "config_only": ({"model_max_length": 77, "pad_token": "<|endoftext|>",
                     "bos_token": {**_d("<|startoftext|>", True), "__type": "AddedToken"},
                     "eos_token": {**_d("<|endoftext|>", True), "__type": "AddedToken"}}, None),
    "no_config": (None, None),
}


@pytest.mark.parametrize("name", sorted(SPECIAL_CONFIGS))
def test_special_token_configs(name, transformers, tmp_path):
    config, special_map = SPECIAL_CONFIGS[name]
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(ASSETS_DIR, f), tmp_path)
    if config is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    if special_map is not None:
        (tmp_path / "special_tokens_map.json").write_text(json.dumps(special_map))
    hf = transformers.CLIPTokenizer.from_pretrained(str(tmp_path))
    tok = CLIPTokenizer.from_pretrained(tmp_path)
    assert tok.pad_token_id == hf.pad_token_id
    for text in ("<|STARTOFTEXT|>a<|ENDOFTEXT|>!", "hi!! <|endoftext|>x<|startoftext|>", "a [V] dog!"):
        assert tok.encode(text) == hf(text)["input_ids"], text
