"""Pure-Python CLIP BPE tokenizer (the text tokenizer of Stable Diffusion 1.x / 2.x).

No transformers / torch / tokenizers import: only the standard library, ``numpy`` and ``regex``.
The vocabulary of OpenAI CLIP ships with the package (``rpo_jax/assets/clip_tokenizer``, see the
README there); :meth:`CLIPTokenizer.from_pretrained` also reads the ``tokenizer/`` folder of a
diffusers checkpoint (or any folder written by transformers).

Behaviour mirrored: transformers 5.x ``CLIPTokenizer``
-----------------------------------------------------
transformers >= 5 has a single CLIP tokenizer backed by HuggingFace ``tokenizers``
(``CLIPTokenizerFast`` is an alias of ``CLIPTokenizer``); it no longer uses ``ftfy`` or a Python
"slow" path, so whether ``ftfy`` is installed makes no difference. Its pipeline, reproduced here:

1. **Added / special tokens** (bos, eos, unk, pad, plus any ``added_tokens_decoder`` entries) are
   split out of the *raw* text first, leftmost-longest, and map straight to their id. A token whose
   ``normalized`` flag is true is instead matched in the normalised text (step 2). Consequence worth
   knowing: with SD 2.x's pad token ``"!"`` every ``!`` in a prompt becomes id 0 (``"hi!!"`` ->
   ``hi</w> ! !``, not ``hi</w> !!</w>``); transformers does exactly this, so we do too.
2. **Normalisation**: Unicode NFC, then per-character lowercasing (Rust ``char::to_lowercase``: no
   Greek final-sigma rule, ``"ΟΔΟΣ"`` -> ``"οδοσ"``). Whitespace runs (Unicode ``White_Space``, the
   ``\\s`` of both Oniguruma and the ``regex`` module) only separate words. No control-character
   removal, no CJK spacing, no ``ftfy.fix_text``, no HTML unescaping.
3. **Pre-tokenisation**: CLIP's pattern
   ``<\\|startoftext\\|>|<\\|endoftext\\|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+``
   (digits one at a time, runs of letters, runs of other symbols), each piece then split again by
   the GPT-2 byte-level pattern (this only changes the two literal special strings when they were
   not matched as special tokens: ``"<|endoftext|>"`` -> ``"<|"``, ``"endoftext"``, ``"|>"``).
4. **Byte-level BPE**: the UTF-8 bytes of each piece are mapped to printable characters
   (``bytes_to_unicode``), ``</w>`` is appended to the last symbol and the 48,894 CLIP merges are
   applied lowest rank first (results cached per word).
5. ``[bos] + tokens + [eos]``; truncation keeps the first ``max_length - 2`` tokens and then
   appends eos (so the last real token is always eos); padding with ``pad_token_id`` on the right.

Special-token resolution in :meth:`CLIPTokenizer.from_pretrained` follows transformers 5.x: values
in ``tokenizer_config.json``; if that file has no ``added_tokens_decoder``, ``special_tokens_map.json``
overrides it (this is how SD 2.x gets pad ``"!"``) and ``added_tokens.json`` / ``tokenizer.json``
``added_tokens`` supply flags; when several special tokens share one string (eos/unk/pad
``<|endoftext|>``) the one listed last in (bos, eos, unk, sep, pad, cls, mask) decides its
``normalized`` flag. Token values may be plain strings or ``{"content": ...}`` dicts in either file.

Known remaining differences
---------------------------
* Unicode tables: NFC and lowercasing use Python's ``unicodedata`` (Unicode 14.0 on Python 3.11,
  15.x on 3.12/3.13, 16.0 on 3.14), letter/number classes come from the ``regex`` module, whereas
  ``tokenizers`` uses Rust's tables and Oniguruma. Measured (Python 3.11, regex 2026.11.19,
  transformers 5.24 / tokenizers 0.23), sweeping all 1,112,064 code points through
  ``f"a{c}b {c}{c}1{c}X{c}Σ{c}"``: no difference for any code point assigned in Unicode 14;
  17,507 code points unassigned in Unicode 14 differ (the ``regex`` module already classes them
  as letters/numbers, Oniguruma does not; 55 of them, e.g. U+A7CB, U+A7DC and the Garay capitals
  U+10D50.., also get a Unicode 16 lowercase mapping from Rust). ``tests/test_tokenizer.py``
  re-checks a sample of code points against the installed transformers.
* ``lstrip`` / ``rstrip`` / ``single_word`` flags of added tokens are ignored (CLIP never sets them).
* Versus OpenAI's reference ``SimpleTokenizer`` (and transformers 4.x's slow tokenizer with
  ``ftfy`` installed): that one runs ``ftfy.fix_text`` (curly quotes -> straight: ``don’t`` gives
  ``don 't`` there but ``don ’ t`` here; full-width letters and ligatures -> ASCII; control
  characters dropped; mojibake repaired) and ``html.unescape`` twice (``&amp;`` -> ``&``), lowercases
  with ``str.lower`` (final sigma ``ς``), and maps the literal strings ``<|startoftext|>`` /
  ``<|endoftext|>`` to their ids in any letter case. transformers 4.x's slow tokenizer *without*
  ftfy used BERT's ``BasicTokenizer`` instead (drops control characters, puts spaces around every
  CJK ideograph so ``"日本"`` gave two words). Stable Diffusion was trained with OpenAI's
  tokenizer, but diffusers pipelines use transformers, which is what this module matches; plain
  prompts (ASCII, accents, CJK, emoji, straight apostrophes) give the same ids everywhere.
"""
from __future__ import annotations

import json
import os
import unicodedata
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import regex

__all__ = ["CLIPTokenizer", "TokenizerFileError", "ASSETS_DIR", "bytes_to_unicode"]

ASSETS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "clip_tokenizer")

VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
ADDED_TOKENS_FILE = "added_tokens.json"
TOKENIZER_JSON_FILE = "tokenizer.json"

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
END_OF_WORD = "</w>"
DEFAULT_MODEL_MAX_LENGTH = 77

# transformers' SPECIAL_TOKENS_ATTRIBUTES, in its order (the order decides flag precedence).
_SPECIAL_ATTRS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_DEFAULT_SPECIALS = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}

# CLIP's pre-tokenizer pattern (transformers/tokenizers and OpenAI, without OpenAI's IGNORECASE,
# which is moot after lowercasing).
_CLIP_PAT = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
# GPT-2 pattern of tokenizers' ByteLevel pre-tokenizer (use_regex=True), applied to each CLIP piece.
_BYTELEVEL_PAT = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")

_BPE_CACHE_SIZE = 100_000


def bytes_to_unicode() -> dict[int, str]:
    """OpenAI/GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


_BYTE_ENCODER = bytes_to_unicode()
_BYTE_DECODER = {c: b for b, c in _BYTE_ENCODER.items()}
# bytes.translate-style table: byte value -> unicode char, for fast byte-level encoding.
_BYTE_TABLE = [_BYTE_ENCODER[b] for b in range(256)]


def _lowercase(text: str) -> str:
    """Per-character lowercasing (Rust ``char::to_lowercase``, as tokenizers' ``Lowercase``).

    ``str.lower`` differs only by its context-dependent Greek final-sigma rule (U+03A3).
    """
    if "\u03a3" in text:
        return "".join(c.lower() for c in text)
    return text.lower()


def _normalize(text: str) -> str:
    """tokenizers' ``Sequence([NFC, Replace(\\s+, " "), Lowercase])`` (whitespace only separates)."""
    return _lowercase(unicodedata.normalize("NFC", text))


class TokenizerFileError(ValueError):
    """A tokenizer file has invalid JSON or unexpected content (the message names the file)."""


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise TokenizerFileError(f"{path}: invalid JSON ({e})") from e
    except UnicodeDecodeError as e:
        raise TokenizerFileError(f"{path}: not UTF-8 text ({e})") from e


def _token_spec(value: Any, where: str, special: bool) -> dict[str, Any] | None:
    """A special/added token value (str, ``{"content": ...}`` dict or None) -> spec dict."""
    if value is None:
        return None
    if isinstance(value, str):
        # A plain string becomes AddedToken(value, special=True): normalized=False.
        return {"content": value, "normalized": not special, "special": special}
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        normalized = value.get("normalized")
        is_special = bool(value.get("special", special))
        if normalized is None:
            normalized = not is_special
        return {"content": value["content"], "normalized": bool(normalized), "special": is_special}
    raise TokenizerFileError(f"{where}: expected a string or a {{'content': ...}} dict, got {value!r}")


def _as_id(value: Any, where: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise TokenizerFileError(f"{where}: expected an integer token id, got {value!r}") from None


def _load_vocab(path: str) -> dict[str, int]:
    vocab = _read_json(path)
    if not isinstance(vocab, dict) or not all(isinstance(k, str) and isinstance(v, int) for k, v in vocab.items()):
        raise TokenizerFileError(f"{path}: expected a JSON object mapping token strings to integer ids")
    return vocab


def _load_merges(path: str) -> list[tuple[str, str]]:
    merges = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if lineno == 1 and line.startswith("#version"):
                continue
            if not line.strip():
                continue
            parts = line.split(" ")
            if len(parts) != 2:
                raise TokenizerFileError(f"{path}:{lineno}: expected a merge 'a b', got {line!r}")
            merges.append((parts[0], parts[1]))
    return merges


def batch_encode(texts: str | Sequence[str], token_ids: Callable[[str], list[int]], *, first_id: int,
                 last_id: int, pad_id: int, max_length: int, padding: bool | str, truncation: bool,
                 overlong: str) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``[first] + token_ids(text) + [last]``, truncated and right-padded like transformers.

    Shared by the CLIP BPE and the BERT WordPiece tokenizers. ``padding``: ``"max_length"``,
    ``"longest"`` / ``True`` or ``False`` / ``"do_not_pad"`` (rows must then be equally long).
    ``truncation`` keeps ``first``, the first ``max_length - 2`` tokens and ``last``. Without it a
    row longer than ``max_length`` (with ``padding="max_length"``) raises (``overlong="raise"``)
    or widens the batch to the longest row (``overlong="extend"``, as ``AlignProcessor`` returns).
    Returns (input_ids, attention_mask), int32 (N, L).
    """
    if isinstance(texts, str):
        texts = [texts]
    if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) or max_length < 2:
        raise ValueError(f"max_length must be an integer >= 2 (room for the two special tokens), "
                         f"got {max_length!r}")
    if padding is True:
        padding = "longest"
    elif padding is False:
        padding = "do_not_pad"
    if padding not in ("max_length", "longest", "do_not_pad"):
        raise ValueError(f"padding must be 'max_length', 'longest', True or False, got {padding!r}")
    rows = []
    for t in texts:
        if not isinstance(t, str):
            raise TypeError(f"expected str, got {type(t).__name__}")
        toks = token_ids(t)
        if truncation and len(toks) > max_length - 2:
            toks = toks[: max_length - 2]
        row = [first_id, *toks, last_id]
        if len(row) > max_length and padding == "max_length" and overlong == "raise":
            raise ValueError(f"{len(row)} tokens > max_length={max_length} with truncation=False: {t[:60]!r}")
        rows.append(row)
    if padding == "max_length":
        length = max([int(max_length)] + [len(r) for r in rows])
    else:
        length = max((len(r) for r in rows), default=0)
        if padding == "do_not_pad" and any(len(r) != length for r in rows):
            raise ValueError("padding=False needs rows of equal length; use padding='longest' or 'max_length'")
    input_ids = np.full((len(rows), length), pad_id, dtype=np.int32)
    attention_mask = np.zeros((len(rows), length), dtype=np.int32)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = row
        attention_mask[i, : len(row)] = 1
    return input_ids, attention_mask


class CLIPTokenizer:
    """CLIP byte-level BPE tokenizer matching transformers' ``CLIPTokenizer`` ids.

    Args:
        vocab: token string -> id (49,408 entries for CLIP).
        merges: BPE merges in rank order (48,894 pairs for CLIP).
        model_max_length: default sequence length of :meth:`__call__` (77 for CLIP).
        bos_token, eos_token, unk_token, pad_token: special tokens, each a string or a
            ``{"content": str, "normalized": bool, ...}`` dict. Their ids are looked up in
            ``vocab`` (a string not in ``vocab`` gets the next free id, as transformers does).
        added_tokens: extra ``{"id", "content", "normalized", "special"}`` dicts (e.g. from a
            ``tokenizer_config.json`` ``added_tokens_decoder``), split out of the text like the
            special tokens.

    Attributes:
        model_max_length, bos_token_id, eos_token_id, pad_token_id, unk_token_id, vocab_size
        (size of the id space, including added tokens), bos_token, eos_token, pad_token, unk_token.
    """

    def __init__(
        self,
        vocab: dict[str, int],
        merges: Sequence[tuple[str, str]],
        model_max_length: int = DEFAULT_MODEL_MAX_LENGTH,
        bos_token: str | dict = BOS,
        eos_token: str | dict = EOS,
        unk_token: str | dict = EOS,
        pad_token: str | dict = EOS,
        added_tokens: Iterable[dict] = (),
        **extra_special_tokens: str | dict | None,
    ):
        self._vocab: dict[str, int] = dict(vocab)  # as read from vocab.json (written back by save_pretrained)
        self.encoder: dict[str, int] = dict(vocab)
        self.bpe_ranks: dict[tuple[str, str], int] = {tuple(m): i for i, m in enumerate(merges)}
        self.model_max_length = int(model_max_length)
        self._cache: dict[str, list[int]] = {}

        specials = {"bos_token": bos_token, "eos_token": eos_token, "unk_token": unk_token, "pad_token": pad_token}
        for k, v in extra_special_tokens.items():
            if k not in _SPECIAL_ATTRS:
                raise TypeError(f"unexpected keyword argument {k!r}")
            specials[k] = v
        self._special_specs: dict[str, dict] = {}
        for attr in _SPECIAL_ATTRS:
            spec = _token_spec(specials.get(attr), attr, special=True)
            if spec is not None:
                spec["special"] = True
                self._special_specs[attr] = spec

        # Added-token table, built like transformers: explicit added tokens (sorted by id) then
        # special tokens; for one string the last entry decides the flags.
        self.added_tokens: dict[str, dict] = {}
        for tok in sorted(added_tokens, key=lambda t: t["id"]):
            tok = dict(tok)
            self.added_tokens[tok["content"]] = tok
            self.encoder.setdefault(tok["content"], tok["id"])
            if self.encoder[tok["content"]] != tok["id"]:
                raise ValueError(
                    f"added token {tok['content']!r} has id {tok['id']} but the vocabulary says {self.encoder[tok['content']]}"
                )
        explicit = set(self.added_tokens)
        for attr in _SPECIAL_ATTRS:
            spec = self._special_specs.get(attr)
            if spec is None or spec["content"] in explicit:
                continue
            content = spec["content"]
            if content not in self.encoder:
                self.encoder[content] = max(self.encoder.values(), default=-1) + 1
            self.added_tokens[content] = {"id": self.encoder[content], **spec}
        for attr, spec in self._special_specs.items():
            self.added_tokens[spec["content"]]["special"] = True

        self.decoder: dict[int, str] = {i: t for t, i in self.encoder.items()}
        self._raw_pat = self._added_pattern(normalized=False)
        self._norm_pat = self._added_pattern(normalized=True)

    # ------------------------------------------------------------------ loading / saving

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, subfolder: str | None = None, **overrides) -> "CLIPTokenizer":
        """Loads a transformers/diffusers tokenizer folder.

        Reads ``vocab.json`` + ``merges.txt`` (or, failing both, the BPE model of a transformers 5.x
        ``tokenizer.json``), plus ``tokenizer_config.json``, ``special_tokens_map.json``,
        ``added_tokens.json`` when present. ``path`` may also be a diffusers model root that has a
        ``tokenizer/`` subfolder. ``overrides`` (e.g. ``pad_token="!"``, ``model_max_length=77``)
        take precedence over the files, like keyword arguments of transformers' ``from_pretrained``.
        ``model_max_length`` defaults to 77 when the config has none (transformers then uses an
        "unlimited" 1e30 sentinel, with which padding to max length fails).

        Raises:
            FileNotFoundError: the folder or a required file is missing (the message names it).
            ValueError: a file has invalid JSON or unexpected content (the message names it).
        """
        folder = os.fspath(path)
        if subfolder:
            folder = os.path.join(folder, subfolder)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"tokenizer folder not found: {folder}")
        if (
            subfolder is None
            and not os.path.exists(os.path.join(folder, VOCAB_FILE))
            and not os.path.exists(os.path.join(folder, TOKENIZER_JSON_FILE))
            and os.path.isdir(os.path.join(folder, "tokenizer"))
        ):
            folder = os.path.join(folder, "tokenizer")

        def p(name: str) -> str:
            return os.path.join(folder, name)

        tok_json = None
        if os.path.exists(p(TOKENIZER_JSON_FILE)):
            tok_json = _read_json(p(TOKENIZER_JSON_FILE))
            if not isinstance(tok_json, dict):
                raise TokenizerFileError(f"{p(TOKENIZER_JSON_FILE)}: expected a JSON object")

        if os.path.exists(p(VOCAB_FILE)) or os.path.exists(p(MERGES_FILE)) or tok_json is None:
            for name in (VOCAB_FILE, MERGES_FILE):
                if not os.path.exists(p(name)):
                    raise FileNotFoundError(f"tokenizer file not found: {p(name)}")
            vocab = _load_vocab(p(VOCAB_FILE))
            merges = _load_merges(p(MERGES_FILE))
        else:
            vocab, merges = cls._bpe_from_tokenizer_json(tok_json, p(TOKENIZER_JSON_FILE))

        config: dict[str, Any] = {}
        if os.path.exists(p(CONFIG_FILE)):
            config = _read_json(p(CONFIG_FILE))
            if not isinstance(config, dict):
                raise TokenizerFileError(f"{p(CONFIG_FILE)}: expected a JSON object")

        specials: dict[str, Any] = {}
        for k in _SPECIAL_ATTRS:
            if k in config:
                v = config[k]
                _token_spec(v, f"{p(CONFIG_FILE)}: {k}", special=True)  # validate, naming the file
                if isinstance(v, dict) and "normalized" not in v:
                    # transformers builds AddedToken(**v): normalized defaults to "not special".
                    v = {**v, "normalized": not v.get("special", False)}
                specials[k] = v
        added: dict[int, dict] = {}
        if "added_tokens_decoder" in config:
            atd = config["added_tokens_decoder"]
            if not isinstance(atd, dict):
                raise TokenizerFileError(f"{p(CONFIG_FILE)}: added_tokens_decoder must be an object")
            for idx, tok in atd.items():
                where = f"{p(CONFIG_FILE)}: added_tokens_decoder[{idx!r}]"
                added[_as_id(idx, where)] = {"id": _as_id(idx, where), **_token_spec(tok, where, special=False)}
        else:
            # transformers' legacy path: special_tokens_map.json overrides tokenizer_config.json.
            if os.path.exists(p(SPECIAL_TOKENS_MAP_FILE)):
                stm = _read_json(p(SPECIAL_TOKENS_MAP_FILE))
                if not isinstance(stm, dict):
                    raise TokenizerFileError(f"{p(SPECIAL_TOKENS_MAP_FILE)}: expected a JSON object")
                for k in _SPECIAL_ATTRS:
                    if k in stm:
                        v = stm[k]
                        _token_spec(v, f"{p(SPECIAL_TOKENS_MAP_FILE)}: {k}", special=True)
                        if isinstance(v, dict):
                            v = {**v, "special": True}
                        specials[k] = v
            if os.path.exists(p(ADDED_TOKENS_FILE)):
                at = _read_json(p(ADDED_TOKENS_FILE))
                if not isinstance(at, dict):
                    raise TokenizerFileError(f"{p(ADDED_TOKENS_FILE)}: expected a JSON object")
                special_strings = {s["content"] for s in (
                    _token_spec(v, k, True) for k, v in specials.items()) if s is not None}
                for content, idx in at.items():
                    is_special = content in special_strings
                    i = _as_id(idx, f"{p(ADDED_TOKENS_FILE)}: {content!r}")
                    added[i] = {"id": i, "content": content, "normalized": not is_special, "special": is_special}
            if tok_json is not None:
                for tok in tok_json.get("added_tokens") or []:
                    where = f"{p(TOKENIZER_JSON_FILE)}: added_tokens"
                    spec = _token_spec(tok, where, special=False)
                    i = _as_id(tok.get("id"), where)
                    added[i] = {"id": i, **spec}
        # Keyword overrides win over the files (transformers: kwargs > special_tokens_map > config).
        for k, v in overrides.items():
            if k in _SPECIAL_ATTRS:
                specials[k] = v
        # A special token whose string is an added token takes that token's flags.
        by_content = {t["content"]: t for t in added.values()}
        for k, v in list(specials.items()):
            spec = _token_spec(v, f"{folder}: {k}", special=True)
            if spec is not None and spec["content"] in by_content:
                specials[k] = {**by_content[spec["content"]], "special": True}

        model_max_length = overrides.get("model_max_length", config.get("model_max_length", DEFAULT_MODEL_MAX_LENGTH))
        if not isinstance(model_max_length, (int, float)) or model_max_length > 1e9:
            model_max_length = DEFAULT_MODEL_MAX_LENGTH  # transformers' "unset" sentinel is 1e30
        unknown = set(overrides) - set(_SPECIAL_ATTRS) - {"model_max_length"}
        if unknown:
            raise TypeError(f"unexpected keyword arguments: {sorted(unknown)}")
        kwargs: dict[str, Any] = dict(_DEFAULT_SPECIALS)
        kwargs.update(specials)
        try:
            return cls(vocab, merges, model_max_length=int(model_max_length), added_tokens=list(added.values()), **kwargs)
        except ValueError as e:
            raise TokenizerFileError(f"{folder}: {e}") from e

    @staticmethod
    def _bpe_from_tokenizer_json(tok_json: dict, path: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
        model = tok_json.get("model")
        if not isinstance(model, dict) or model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
            raise TokenizerFileError(f"{path}: not a BPE tokenizer.json (model.type must be 'BPE')")
        if model.get("end_of_word_suffix") != END_OF_WORD:
            raise TokenizerFileError(f"{path}: not a CLIP tokenizer (end_of_word_suffix must be '</w>')")
        merges = []
        for m in model.get("merges") or []:
            pair = tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
            if len(pair) != 2:
                raise TokenizerFileError(f"{path}: bad merge {m!r}")
            merges.append(pair)
        return dict(model["vocab"]), merges

    @classmethod
    def default(cls, pad_token: str = EOS, model_max_length: int = DEFAULT_MODEL_MAX_LENGTH) -> "CLIPTokenizer":
        """The packaged OpenAI CLIP vocabulary, configured like the Hub's tokenizer folders.

        ``pad_token="<|endoftext|>"`` gives SD 1.x's ``tokenizer/`` (and
        ``openai/clip-vit-large-patch14``), ``pad_token="!"`` SD 2.x's. As in those folders,
        bos/eos/unk are ``{"normalized": true}`` tokens and the pad token a plain string, so even
        literal special strings in a prompt (``"<|ENDOFTEXT|>"``) tokenize exactly as transformers
        does with those folders.
        """
        vocab = _load_vocab(os.path.join(ASSETS_DIR, VOCAB_FILE))
        merges = _load_merges(os.path.join(ASSETS_DIR, MERGES_FILE))

        def hub(content: str) -> dict:
            return {"content": content, "normalized": True}

        return cls(vocab, merges, model_max_length=model_max_length, bos_token=hub(BOS), eos_token=hub(EOS),
                   unk_token=hub(EOS), pad_token=pad_token)

    def save_pretrained(self, path: str | os.PathLike) -> list[str]:
        """Writes ``vocab.json``, ``merges.txt``, ``tokenizer_config.json``, ``special_tokens_map.json``.

        The folder loads with identical ids in transformers' ``CLIPTokenizer`` /
        ``CLIPTokenizerFast.from_pretrained`` and in :meth:`from_pretrained`. Returns the paths.
        """
        folder = os.fspath(path)
        os.makedirs(folder, exist_ok=True)
        paths = [os.path.join(folder, n) for n in (VOCAB_FILE, MERGES_FILE, CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE)]
        base_vocab = dict(sorted(self._vocab.items(), key=lambda kv: kv[1]))
        with open(paths[0], "w", encoding="utf-8", newline="\n") as f:
            f.write(json.dumps(base_vocab, ensure_ascii=False))
        with open(paths[1], "w", encoding="utf-8", newline="\n") as f:
            f.write("#version: 0.2\n")
            for a, b in sorted(self.bpe_ranks, key=self.bpe_ranks.__getitem__):
                f.write(f"{a} {b}\n")

        def full(tok: dict) -> dict:
            return {"content": tok["content"], "lstrip": False, "normalized": bool(tok["normalized"]),
                    "rstrip": False, "single_word": False, "special": bool(tok["special"])}

        config: dict[str, Any] = {
            "add_prefix_space": False,
            "added_tokens_decoder": {
                str(t["id"]): full(t) for t in sorted(self.added_tokens.values(), key=lambda t: t["id"])
            },
            "clean_up_tokenization_spaces": False,
            "do_lower_case": True,
            "errors": "replace",
            "model_max_length": self.model_max_length,
            "tokenizer_class": "CLIPTokenizer",
        }
        stm: dict[str, Any] = {}
        for attr, spec in self._special_specs.items():
            config[attr] = spec["content"]
            tok = self.added_tokens[spec["content"]]
            stm[attr] = {k: v for k, v in full(tok).items() if k != "special"}
        config = dict(sorted(config.items()))
        with open(paths[2], "w", encoding="utf-8", newline="\n") as f:
            f.write(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        with open(paths[3], "w", encoding="utf-8", newline="\n") as f:
            f.write(json.dumps(stm, indent=2, ensure_ascii=False) + "\n")
        return paths

    # ------------------------------------------------------------------ properties

    def _special_id(self, attr: str) -> int | None:
        spec = self._special_specs.get(attr)
        return None if spec is None else self.encoder[spec["content"]]

    def _special_str(self, attr: str) -> str | None:
        spec = self._special_specs.get(attr)
        return None if spec is None else spec["content"]

    bos_token = property(lambda self: self._special_str("bos_token"))
    eos_token = property(lambda self: self._special_str("eos_token"))
    unk_token = property(lambda self: self._special_str("unk_token"))
    pad_token = property(lambda self: self._special_str("pad_token"))
    bos_token_id = property(lambda self: self._special_id("bos_token"))
    eos_token_id = property(lambda self: self._special_id("eos_token"))
    unk_token_id = property(lambda self: self._special_id("unk_token"))
    pad_token_id = property(lambda self: self._special_id("pad_token"))

    @property
    def vocab_size(self) -> int:
        """Number of ids (49,408 for CLIP, more if added tokens extend the vocabulary)."""
        return max(self.decoder) + 1

    def __len__(self) -> int:
        return self.vocab_size

    def get_vocab(self) -> dict[str, int]:
        return dict(self.encoder)

    def __repr__(self) -> str:
        return (f"CLIPTokenizer(vocab_size={self.vocab_size}, model_max_length={self.model_max_length}, "
                f"bos={self.bos_token!r}, eos={self.eos_token!r}, pad={self.pad_token!r})")

    # ------------------------------------------------------------------ encoding

    def _added_pattern(self, normalized: bool):
        toks = sorted((t for t, s in self.added_tokens.items() if bool(s["normalized"]) == normalized and t),
                      key=len, reverse=True)
        if not toks:
            return None
        return regex.compile("|".join(regex.escape(t) for t in toks))

    @staticmethod
    def _split(text: str, pat) -> list[tuple[str, bool]]:
        """Splits ``text`` around matches of ``pat``: ``[(piece, is_added_token), ...]``."""
        if pat is None or not text:
            return [(text, False)] if text else []
        out, pos = [], 0
        for m in pat.finditer(text):
            if m.start() > pos:
                out.append((text[pos:m.start()], False))
            out.append((m.group(), True))
            pos = m.end()
        if pos < len(text):
            out.append((text[pos:], False))
        return out

    def _bpe(self, word: str) -> list[int]:
        """BPE ids of one pre-tokenized word (a str without whitespace)."""
        ids = self._cache.get(word)
        if ids is not None:
            return ids
        chars = "".join(_BYTE_TABLE[b] for b in word.encode("utf-8"))
        symbols = list(chars[:-1]) + [chars[-1] + END_OF_WORD]
        ranks = self.bpe_ranks
        while len(symbols) > 1:
            best, best_rank = None, None
            for pair in zip(symbols, symbols[1:]):
                r = ranks.get(pair)
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = pair, r
            if best is None:
                break
            first, second = best
            merged, i, n = [], 0, len(symbols)
            while i < n:
                if i < n - 1 and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        unk = self.unk_token_id
        ids = [self.encoder.get(s, unk) for s in symbols]
        if len(self._cache) >= _BPE_CACHE_SIZE:
            self._cache.clear()
        self._cache[word] = ids
        return ids

    def _tokens_ids(self, text: str) -> list[int]:
        """Ids of ``text`` without bos/eos."""
        ids: list[int] = []
        for piece, is_added in self._split(text, self._raw_pat):
            if is_added:
                ids.append(self.encoder[piece])
                continue
            for npiece, n_added in self._split(_normalize(piece), self._norm_pat):
                if n_added:
                    ids.append(self.encoder[npiece])
                    continue
                for word in _CLIP_PAT.findall(npiece):
                    if word[0] == "<" and word in (BOS, EOS):
                        for sub in _BYTELEVEL_PAT.findall(word):
                            ids.extend(self._bpe(sub))
                    else:
                        ids.extend(self._bpe(word))
        return ids

    def tokenize(self, text: str) -> list[str]:
        """Token strings of ``text`` (no bos/eos), e.g. ``"a dog's"`` -> ``['a</w>', 'dog</w>', "'s</w>"]``."""
        return [self.decoder[i] for i in self._tokens_ids(text)]

    def encode(self, text: str) -> list[int]:
        """``[bos] + BPE ids + [eos]`` for one string; no padding, no truncation."""
        return [self.bos_token_id, *self._tokens_ids(text), self.eos_token_id]

    def __call__(
        self,
        texts: str | Sequence[str],
        max_length: int | None = None,
        padding: bool | str = "max_length",
        truncation: bool = True,
    ) -> dict[str, np.ndarray]:
        """Batch-encodes like ``transformers_tokenizer(texts, padding=..., max_length=..., truncation=...)``.

        Args:
            texts: a string or a sequence of N strings.
            max_length: sequence length (default ``model_max_length``, 77).
            padding: ``"max_length"`` (pad every row to ``max_length``), ``"longest"`` / ``True``
                (pad to the longest row), or ``False`` / ``"do_not_pad"`` (rows must then have
                equal lengths).
            truncation: keep at most ``max_length`` ids per row (bos, the first ``max_length - 2``
                tokens, eos). With ``truncation=False`` a longer row raises ``ValueError``
                (a ragged batch cannot be returned as one array).

        Returns:
            ``{"input_ids": int32 (N, L), "attention_mask": int32 (N, L)}`` with ``L = max_length``
            for ``padding="max_length"``; N = 1 for a single string. Padding (right side) uses
            ``pad_token_id`` with attention mask 0.
        """
        if max_length is None:
            max_length = self.model_max_length
        pad = self.pad_token_id if self.pad_token_id is not None else self.eos_token_id
        input_ids, attention_mask = batch_encode(
            texts, self._tokens_ids, first_id=self.bos_token_id, last_id=self.eos_token_id,
            pad_id=pad, max_length=max_length, padding=padding, truncation=truncation,
            overlong="raise")
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    # ------------------------------------------------------------------ decoding

    def decode(self, ids: Iterable[int] | np.ndarray, skip_special_tokens: bool = False) -> str:
        """Text of a 1-D id sequence, like transformers' ``decode``.

        ``</w>`` becomes a space and the result is stripped, so ``"a dog's"`` round-trips to
        ``"a dog 's"``; with ``skip_special_tokens`` the special tokens (bos, eos, pad - also ``!``
        when it is the pad token, as in transformers) are dropped.
        """
        special_ids = {self.encoder[t] for t, s in self.added_tokens.items() if s["special"]}
        out = bytearray()
        for i in np.asarray(ids, dtype=np.int64).reshape(-1).tolist():
            if skip_special_tokens and i in special_ids:
                continue
            tok = self.decoder.get(i)
            if tok is None:
                continue
            for c in tok:
                b = _BYTE_DECODER.get(c)
                if b is None:
                    out.extend(c.encode("utf-8"))
                else:
                    out.append(b)
        text = out.decode("utf-8", errors="replace")
        return text.replace(END_OF_WORD, " ").strip()

    def batch_decode(self, ids: Iterable[Iterable[int]] | np.ndarray, skip_special_tokens: bool = False) -> list[str]:
        """:meth:`decode` of each row of an (N, L) id array."""
        return [self.decode(row, skip_special_tokens=skip_special_tokens) for row in ids]
