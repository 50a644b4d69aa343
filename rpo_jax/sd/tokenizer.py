"""CLIP BPE tokenizer (the text tokenizer of Stable Diffusion 1.x / 2.x), a thin wrapper over ``tokenizers``.

HuggingFace ``tokenizers`` (the Rust engine behind transformers >= 5's one ``CLIPTokenizer``) does
all the text work, built exactly as transformers builds it (``CLIPTokenizer.__init__``, the
``CLIPConverter`` of ``convert_slow_tokenizer.py``), so ids match transformers by construction:
added / special tokens split out of the raw text (or of the normalised text, for tokens flagged
``normalized``), ``NFC`` + whitespace + ``Lowercase`` normalisation, CLIP's split pattern then the
byte-level pre-tokenizer, byte-level BPE with the ``</w>`` suffix, ``[bos] + tokens + [eos]``
(``RobertaProcessing``), truncation (bos, the first ``max_length - 2`` tokens, eos), right padding
and byte-level decoding. The OpenAI CLIP vocabulary ships with the package
(``rpo_jax/assets/clip_tokenizer``, see the README there).

Written here, because the library knows nothing of transformers' folder layout or of numpy:

* :meth:`CLIPTokenizer.from_pretrained` reads ``vocab.json`` + ``merges.txt`` (or the BPE model of
  the ``tokenizer.json`` transformers 5 saves) and resolves the special tokens as transformers 5
  does: values in ``tokenizer_config.json``; without an ``added_tokens_decoder`` there,
  ``special_tokens_map.json`` overrides them (this is how SD 2.x gets pad ``"!"``) and
  ``added_tokens.json`` / ``tokenizer.json`` ``added_tokens`` supply flags; when several special
  tokens share one string (eos/unk/pad ``<|endoftext|>``) the one listed last in
  (bos, eos, unk, sep, pad, cls, mask) decides its ``normalized`` flag.
* :meth:`CLIPTokenizer.save_pretrained` writes that legacy layout (which diffusers folders use).
* :func:`batch_encode` returns fixed-shape int32 arrays and raises on ragged batches instead of
  returning lists. It, the folder reader and writer and the special-token plumbing (``_Wrapper``)
  are shared with the BERT tokenizer (``rpo_jax.reward.wordpiece``).

Quirk kept from transformers: with SD 2.x's pad token ``"!"`` (a special token) every ``!`` in a
prompt becomes id 0 (``"hi!!"`` -> ``hi</w> ! !``). Versus OpenAI's reference tokenizer (which
Stable Diffusion was trained with) transformers has no ``ftfy.fix_text`` / HTML unescaping; plain
prompts give the same ids everywhere.
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterable, Sequence

import numpy as np
from tokenizers import AddedToken, Encoding, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

__all__ = ["CLIPTokenizer", "TokenizerFileError", "ASSETS_DIR", "batch_encode"]

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
# transformers' CLIPTokenizer pre-tokenizer split pattern.
_CLIP_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


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


def _read_folder(path: str | os.PathLike, subfolder: str | None, model_file: str, attrs: Sequence[str],
                 overrides: dict) -> tuple[str, dict, dict, list[dict], dict | None]:
    """The special / added tokens of a transformers tokenizer folder, resolved as transformers 5 does.

    ``path`` may be a model root with a ``tokenizer/`` subfolder. Special tokens come from
    ``tokenizer_config.json``; when it has no ``added_tokens_decoder``, ``special_tokens_map.json``
    overrides them and ``added_tokens.json`` / ``tokenizer.json`` supply added tokens; keyword
    ``overrides`` win (and are popped). Returns (folder, config, specials, added tokens, tokenizer.json).
    """
    folder = os.path.join(os.fspath(path), subfolder) if subfolder else os.fspath(path)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"tokenizer folder not found: {folder}")
    if subfolder is None and not any(os.path.exists(os.path.join(folder, n)) for n in (model_file, TOKENIZER_JSON_FILE)) \
            and os.path.isdir(os.path.join(folder, "tokenizer")):
        folder = os.path.join(folder, "tokenizer")

    def read(name: str) -> dict | None:
        p = os.path.join(folder, name)
        if not os.path.exists(p):
            return None
        obj = _read_json(p)
        if not isinstance(obj, dict):
            raise TokenizerFileError(f"{p}: expected a JSON object")
        return obj

    def where(name: str, key: Any) -> str:
        return f"{os.path.join(folder, name)}: {key}"

    config, tok_json = read(CONFIG_FILE) or {}, read(TOKENIZER_JSON_FILE)
    specials: dict[str, Any] = {}
    for k in attrs:
        if k in config:
            v = config[k]
            _token_spec(v, where(CONFIG_FILE, k), special=True)  # validate, naming the file
            if isinstance(v, dict) and "normalized" not in v:
                v = {**v, "normalized": not v.get("special", False)}  # transformers: AddedToken(**v)
            specials[k] = v
    added: dict[int, dict] = {}
    if "added_tokens_decoder" in config:
        if not isinstance(config["added_tokens_decoder"], dict):
            raise TokenizerFileError(f"{where(CONFIG_FILE, 'added_tokens_decoder')} must be an object")
        for idx, tok in config["added_tokens_decoder"].items():
            w = where(CONFIG_FILE, f"added_tokens_decoder[{idx!r}]")
            added[_as_id(idx, w)] = {"id": _as_id(idx, w), **_token_spec(tok, w, special=False)}
    else:  # transformers' legacy path
        stm = read(SPECIAL_TOKENS_MAP_FILE) or {}
        for k in attrs:
            if k in stm:
                _token_spec(stm[k], where(SPECIAL_TOKENS_MAP_FILE, k), special=True)
                specials[k] = {**stm[k], "special": True} if isinstance(stm[k], dict) else stm[k]
        special_strings = {_token_spec(v, k, True)["content"] for k, v in specials.items() if v is not None}
        for content, idx in (read(ADDED_TOKENS_FILE) or {}).items():
            i = _as_id(idx, where(ADDED_TOKENS_FILE, repr(content)))
            is_special = content in special_strings
            added[i] = {"id": i, "content": content, "normalized": not is_special, "special": is_special}
        for tok in (tok_json or {}).get("added_tokens") or []:
            w = where(TOKENIZER_JSON_FILE, "added_tokens")
            added[_as_id(tok.get("id"), w)] = {"id": _as_id(tok.get("id"), w), **_token_spec(tok, w, special=False)}
    for k in attrs:
        if k in overrides:
            specials[k] = overrides.pop(k)
    # A special token whose string is an added token takes that token's flags.
    by_content = {t["content"]: t for t in added.values()}
    for k, v in list(specials.items()):
        spec = _token_spec(v, f"{folder}: {k}", special=True)
        if spec is not None and spec["content"] in by_content:
            specials[k] = {**by_content[spec["content"]], "special": True}
    return folder, config, specials, list(added.values()), tok_json


def _max_length(value: Any, default: int) -> int:
    """A config's ``model_max_length``; ``default`` when unset (transformers' 1e30 sentinel) or unusable."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 2 <= value <= 1e9:
        return default
    return int(value)


def _write_configs(folder: str, tok: Any, config: dict[str, Any], full_special_map: bool) -> list[str]:
    """Writes ``tokenizer_config.json`` (``config`` + the added / special tokens) and
    ``special_tokens_map.json`` (token dicts when ``full_special_map``, else strings). Returns the paths."""

    def full(t: dict) -> dict:
        return {"content": t["content"], "lstrip": False, "normalized": bool(t["normalized"]),
                "rstrip": False, "single_word": False, "special": bool(t["special"])}

    config = {**config, "model_max_length": tok.model_max_length, "added_tokens_decoder": {
        str(t["id"]): full(t) for t in sorted(tok.added_tokens.values(), key=lambda t: t["id"])}}
    stm: dict[str, Any] = {}
    for attr, spec in tok._special_specs.items():
        config[attr] = spec["content"]
        entry = full(tok.added_tokens[spec["content"]])
        stm[attr] = {k: v for k, v in entry.items() if k != "special"} if full_special_map else spec["content"]
    paths = [os.path.join(folder, CONFIG_FILE), os.path.join(folder, SPECIAL_TOKENS_MAP_FILE)]
    # Key order as before: the config sorted, the CLIP map in attribute order, the BERT one sorted.
    for p, obj in zip(paths, (dict(sorted(config.items())), stm if full_special_map else dict(sorted(stm.items())))):
        with open(p, "w", encoding="utf-8", newline="\n") as f:
            f.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
    return paths


def _added_token_table(tokenizer: Tokenizer, added_tokens: Iterable[dict],
                       specials: dict[str, dict]) -> dict[str, dict]:
    """Adds explicit added tokens (by id) then the special tokens to ``tokenizer``, as transformers.

    For one string the last entry decides the flags. Returns content -> ``{"id", "content",
    "normalized", "special"}``; a string missing from the vocabulary gets the library's next id.
    """
    table: dict[str, dict] = {}
    for tok in sorted(added_tokens, key=lambda t: t["id"]):
        table[tok["content"]] = dict(tok)
    explicit = set(table)
    for spec in specials.values():
        if spec["content"] not in explicit:
            table[spec["content"]] = dict(spec)
    for spec in specials.values():
        table[spec["content"]]["special"] = True
    for content, tok in table.items():
        added = AddedToken(content, normalized=bool(tok["normalized"]), special=bool(tok["special"]))
        (tokenizer.add_special_tokens if tok["special"] else tokenizer.add_tokens)([added])
        i = tokenizer.token_to_id(content)
        if "id" in tok and tok["id"] != i:
            raise ValueError(f"added token {content!r} has id {tok['id']} but the vocabulary says {i}")
        tok["id"] = i
    return table


def batch_encode(tokenizer: Tokenizer, texts: str | Sequence[str], *, pad_id: int, pad_token: str,
                 max_length: int, padding: bool | str, truncation: bool,
                 overlong: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Encodes with ``tokenizer`` (its post-processor adds the two special tokens) into arrays.

    Shared by the CLIP BPE and the BERT WordPiece tokenizers. ``padding``: ``"max_length"``,
    ``"longest"`` / ``True`` or ``False`` / ``"do_not_pad"`` (rows must then be equally long).
    ``truncation`` is the library's (first special, the first ``max_length - 2`` tokens, last
    special). Without it a row longer than ``max_length`` (with ``padding="max_length"``) raises
    (``overlong="raise"``) or widens the batch to the longest row (``overlong="extend"``, as
    ``AlignProcessor`` returns). Returns (input_ids, attention_mask, token_type_ids), int32 (N, L).
    """
    if isinstance(texts, str):
        texts = [texts]
    if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) or max_length < 2:
        raise ValueError(f"max_length must be an integer >= 2 (room for the two special tokens), "
                         f"got {max_length!r}")
    padding = {True: "longest", False: "do_not_pad"}.get(padding, padding) if isinstance(padding, bool) else padding
    if padding not in ("max_length", "longest", "do_not_pad"):
        raise ValueError(f"padding must be 'max_length', 'longest', True or False, got {padding!r}")
    for t in texts:
        if not isinstance(t, str):
            raise TypeError(f"expected str, got {type(t).__name__}")
    tokenizer.no_padding()
    if truncation:
        tokenizer.enable_truncation(int(max_length))
    else:
        tokenizer.no_truncation()
    encodings: list[Encoding] = tokenizer.encode_batch(list(texts))
    lengths = [len(e.ids) for e in encodings]
    if padding == "max_length":
        if overlong == "raise":
            for t, n in zip(texts, lengths):
                if n > max_length:
                    raise ValueError(f"{n} tokens > max_length={max_length} with truncation=False: {t[:60]!r}")
        length = max([int(max_length)] + lengths)
    else:
        length = max(lengths, default=0)
        if padding == "do_not_pad" and any(n != length for n in lengths):
            raise ValueError("padding=False needs rows of equal length; use padding='longest' or 'max_length'")
    for e in encodings:
        e.pad(length, pad_id=pad_id, pad_token=pad_token)

    def stack(field: str) -> np.ndarray:
        return np.array([getattr(e, field) for e in encodings], dtype=np.int32).reshape(len(encodings), length)

    return stack("ids"), stack("attention_mask"), stack("type_ids")


def _special_properties(attr: str) -> tuple[property, property]:
    """``(token, token_id)`` properties of the special token ``attr`` (None when it is unset)."""

    def content(self) -> str | None:
        spec = self._special_specs.get(attr)
        return None if spec is None else spec["content"]

    def token_id(self) -> int | None:
        c = content(self)
        return None if c is None else self.added_tokens[c]["id"]

    return property(content), property(token_id)


class _Wrapper:
    """What the CLIP and BERT tokenizers share: special tokens over a ``tokenizers.Tokenizer`` (``backend``)."""

    backend: Tokenizer
    added_tokens: dict[str, dict]

    def _set_specials(self, attrs: Sequence[str], values: dict[str, Any]) -> None:
        self._special_specs: dict[str, dict] = {}
        for attr in attrs:
            spec = _token_spec(values.get(attr), attr, special=True)
            if spec is not None:
                self._special_specs[attr] = {**spec, "special": True}

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    def __len__(self) -> int:
        """Number of distinct tokens including added ones (transformers' ``len(tokenizer)``)."""
        return len(self.get_vocab())

    def tokenize(self, text: str) -> list[str]:
        """Token strings of ``text`` without the two special tokens around it."""
        self.backend.no_truncation()
        return self.backend.encode(text, add_special_tokens=False).tokens

    def encode(self, text: str) -> list[int]:
        """Ids of one string with its two special tokens; no padding, no truncation."""
        self.backend.no_truncation()
        self.backend.no_padding()
        return self.backend.encode(text).ids

    def _decode(self, ids: Iterable[int] | np.ndarray, skip_special_tokens: bool) -> str:
        return self.backend.decode(np.asarray(ids, dtype=np.int64).reshape(-1).tolist(),
                                   skip_special_tokens=skip_special_tokens)

    def batch_decode(self, ids: Iterable[Iterable[int]] | np.ndarray, skip_special_tokens: bool = False) -> list[str]:
        """``decode`` of each row of an (N, L) id array."""
        return [self.decode(row, skip_special_tokens=skip_special_tokens) for row in ids]


class CLIPTokenizer(_Wrapper):
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
        (size of the id space, including added tokens), bos_token, eos_token, pad_token, unk_token,
        added_tokens (content -> flags and id), backend (the ``tokenizers.Tokenizer``).
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
        self._merges: list[tuple[str, str]] = [tuple(m) for m in merges]
        self.model_max_length = int(model_max_length)
        specials = {"bos_token": bos_token, "eos_token": eos_token, "unk_token": unk_token, "pad_token": pad_token}
        for k, v in extra_special_tokens.items():
            if k not in _SPECIAL_ATTRS:
                raise TypeError(f"unexpected keyword argument {k!r}")
            specials[k] = v
        self._set_specials(_SPECIAL_ATTRS, specials)

        unk = self._special_specs.get("unk_token", {}).get("content")
        tok = Tokenizer(models.BPE(vocab=self._vocab, merges=self._merges, dropout=None, continuing_subword_prefix="",
                                   end_of_word_suffix=END_OF_WORD, fuse_unk=False, unk_token=unk))
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_CLIP_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False)])
        tok.decoder = decoders.ByteLevel()
        self.added_tokens = _added_token_table(tok, added_tokens, self._special_specs)
        tok.post_processor = processors.RobertaProcessing(
            (self.eos_token, self.eos_token_id), (self.bos_token, self.bos_token_id),
            trim_offsets=False, add_prefix_space=False)
        self.backend = tok

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
            TokenizerFileError: a file has invalid JSON or unexpected content (the message names it).
        """
        overrides = dict(overrides)
        folder, config, specials, added, tok_json = _read_folder(path, subfolder, VOCAB_FILE, _SPECIAL_ATTRS, overrides)
        files = [os.path.join(folder, n) for n in (VOCAB_FILE, MERGES_FILE)]
        if tok_json is None or any(os.path.exists(p) for p in files):
            for p in files:
                if not os.path.exists(p):
                    raise FileNotFoundError(f"tokenizer file not found: {p}")
            vocab, merges = _load_vocab(files[0]), _load_merges(files[1])
        else:
            vocab, merges = _bpe_from_tokenizer_json(tok_json, os.path.join(folder, TOKENIZER_JSON_FILE))
        model_max_length = _max_length(overrides.pop("model_max_length", config.get("model_max_length")),
                                       DEFAULT_MODEL_MAX_LENGTH)
        if overrides:
            raise TypeError(f"unexpected keyword arguments: {sorted(overrides)}")
        try:
            return cls(vocab, merges, model_max_length=model_max_length, added_tokens=added,
                       **{**_DEFAULT_SPECIALS, **specials})
        except ValueError as e:
            raise TokenizerFileError(f"{folder}: {e}") from e

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
        paths = [os.path.join(folder, n) for n in (VOCAB_FILE, MERGES_FILE)]
        with open(paths[0], "w", encoding="utf-8", newline="\n") as f:
            f.write(json.dumps(dict(sorted(self._vocab.items(), key=lambda kv: kv[1])), ensure_ascii=False))
        with open(paths[1], "w", encoding="utf-8", newline="\n") as f:
            f.write("#version: 0.2\n")
            f.writelines(f"{a} {b}\n" for a, b in self._merges)
        config = {"add_prefix_space": False, "clean_up_tokenization_spaces": False, "do_lower_case": True,
                  "errors": "replace", "tokenizer_class": "CLIPTokenizer"}
        return paths + _write_configs(folder, self, config, full_special_map=True)

    bos_token, bos_token_id = _special_properties("bos_token")
    eos_token, eos_token_id = _special_properties("eos_token")
    unk_token, unk_token_id = _special_properties("unk_token")
    pad_token, pad_token_id = _special_properties("pad_token")

    @property
    def vocab_size(self) -> int:
        """Number of ids (49,408 for CLIP, more if added tokens extend the vocabulary)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __repr__(self) -> str:
        return (f"CLIPTokenizer(vocab_size={self.vocab_size}, model_max_length={self.model_max_length}, "
                f"bos={self.bos_token!r}, eos={self.eos_token!r}, pad={self.pad_token!r})")

    def __call__(
        self,
        texts: str | Sequence[str],
        max_length: int | None = None,
        padding: bool | str = "max_length",
        truncation: bool = True,
    ) -> dict[str, np.ndarray]:
        """Batch-encodes like ``transformers_tokenizer(texts, padding=..., max_length=..., truncation=...)``.

        ``texts``: a string or N strings; ``max_length`` defaults to ``model_max_length`` (77);
        ``padding``: ``"max_length"``, ``"longest"`` / ``True`` or ``False`` / ``"do_not_pad"`` (rows
        must then be equally long); ``truncation`` keeps bos, the first ``max_length - 2`` tokens and
        eos; without it a longer row raises ``ValueError`` (a ragged batch is no array). Returns
        ``{"input_ids", "attention_mask"}``, int32 (N, L), right-padded with ``pad_token_id`` (mask 0).
        """
        if max_length is None:
            max_length = self.model_max_length
        pad, pad_id = (self.pad_token, self.pad_token_id) if self.pad_token is not None else (self.eos_token, self.eos_token_id)
        input_ids, attention_mask, _ = batch_encode(
            self.backend, texts, pad_id=pad_id, pad_token=pad, max_length=max_length, padding=padding,
            truncation=truncation, overlong="raise")
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def decode(self, ids: Iterable[int] | np.ndarray, skip_special_tokens: bool = False) -> str:
        """Text of a 1-D id sequence, like transformers' ``decode``.

        ``</w>`` becomes a space and the result is stripped, so ``"a dog's"`` round-trips to
        ``"a dog 's"``; with ``skip_special_tokens`` the special tokens (bos, eos, pad - also ``!``
        when it is the pad token, as in transformers) are dropped.
        """
        return self._decode(ids, skip_special_tokens).replace(END_OF_WORD, " ").strip()
