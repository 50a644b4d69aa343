"""BERT WordPiece tokenizer (the text tokenizer of ALIGN, ``kakaobrain/align-base``), a thin wrapper over ``tokenizers``.

HuggingFace ``tokenizers`` (the Rust engine behind transformers >= 5's one ``BertTokenizer``) does
all the text work, built exactly as transformers builds it (``BertTokenizer.__init__``, the
``BertConverter`` of ``convert_slow_tokenizer.py``), so ids match transformers by construction:
added / special tokens split out of the raw text (``"a [MASK]b"`` -> ``a [MASK] b``, but
``"[mask]"`` -> ``[ mask ]``), ``BertNormalizer`` (clean text, CJK spacing, accent stripping and
lowercasing as the config says), ``BertPreTokenizer`` (whitespace and punctuation, so a DreamBooth
identifier ``"[V]"`` is three words), ``WordPiece`` (greedy longest match, ``##`` continuations,
``[UNK]`` for a word of more than 100 characters or with an unmatched part), ``[CLS] $A [SEP]``
(``TemplateProcessing``), truncation, right padding, ``token_type_ids`` 0, WordPiece decoding, the
reading of ``vocab.txt`` (``WordPiece.read_file``) and the training of small vocabularies
(``WordPieceTrainer``, :func:`build_vocab`).

Written here, because the library knows nothing of transformers' folder layout or of numpy:

* :meth:`BertTokenizer.from_pretrained` reads ``vocab.txt`` (or the vocabulary of the
  ``tokenizer.json`` transformers 5 writes instead) and, as transformers 5, takes
  ``do_lower_case`` (default true), ``strip_accents`` (default null = follow ``do_lower_case``),
  ``tokenize_chinese_chars`` (default true) and the special / added tokens from
  ``tokenizer_config.json`` (``special_tokens_map.json`` when it has no ``added_tokens_decoder``);
  :meth:`BertTokenizer.save_pretrained` writes ``vocab.txt`` + those two files.
* Fixed-shape int32 arrays (``rpo_jax.sd.tokenizer.batch_encode``), and transformers'
  ``clean_up_tokenization_spaces`` option of :meth:`BertTokenizer.decode`.
* :func:`build_vocab` keeps only the deterministic part of what ``WordPieceTrainer`` learns (see
  there).

**Default length.** ``AlignProcessor`` (transformers 5.24) tokenizes with ``padding="max_length",
max_length=64`` whatever the tokenizer's own ``model_max_length`` says, so :meth:`__call__` pads to
:data:`ALIGN_MAX_LENGTH` = 64 unless given ``max_length``. The processor sets no truncation, though:
a prompt of more than 62 word pieces comes back longer than 64 there. :meth:`__call__` truncates by
default (fixed shapes); ``truncation=False`` reproduces the processor.
"""
from __future__ import annotations

import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

# Shared with the CLIP tokenizer: file reading, special / added tokens, array batching.
from rpo_jax.sd.tokenizer import (CONFIG_FILE, TOKENIZER_JSON_FILE, TokenizerFileError, _added_token_table, _max_length,
                                  _read_folder, _special_properties, _Wrapper, _write_configs, batch_encode)

__all__ = ["BertTokenizer", "TokenizerFileError", "build_vocab", "write_vocab", "read_vocab",
           "ALIGN_MAX_LENGTH", "SPECIAL_TOKENS"]

VOCAB_FILE = "vocab.txt"

ALIGN_MAX_LENGTH = 64  # AlignProcessor's text_kwargs: padding="max_length", max_length=64
MAX_INPUT_CHARS_PER_WORD = 100
CONTINUATION_PREFIX = "##"
# build_vocab's first five ids, as in BERT's vocab (pad 0) and transformers' default BertTokenizer.
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_SPECIAL_ATTRS = ("unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_DEFAULT_SPECIALS = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]",
                     "cls_token": "[CLS]", "mask_token": "[MASK]"}


def _backend(vocab: Mapping[str, int], unk_token: str, do_lower_case: bool = True,
             strip_accents: bool | None = None, tokenize_chinese_chars: bool = True) -> Tokenizer:
    """transformers' BERT pipeline (no special tokens, no post-processor yet)."""
    tok = Tokenizer(models.WordPiece(dict(vocab), unk_token=unk_token,
                                     max_input_chars_per_word=MAX_INPUT_CHARS_PER_WORD))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=tokenize_chinese_chars,
                                                strip_accents=strip_accents, lowercase=do_lower_case)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix=CONTINUATION_PREFIX)
    return tok


# ------------------------------------------------------------------------------------------------
# Vocabulary files
# ------------------------------------------------------------------------------------------------

def read_vocab(path: str | os.PathLike) -> dict[str, int]:
    """token -> id from a ``vocab.txt`` (one token a line, id = line number), by ``WordPiece.read_file``.

    (Lines split on ``\\n``, trailing whitespace trimmed, a repeated token keeps its last line.)
    Raises ``FileNotFoundError`` naming the path, ``TokenizerFileError`` for unreadable content.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer vocabulary not found: {path}")
    try:
        vocab = models.WordPiece.read_file(path)
    except Exception as e:  # the library raises a bare Exception ("stream did not contain valid UTF-8")
        raise TokenizerFileError(f"{path}: {e}") from e
    if not vocab:
        raise TokenizerFileError(f"{path}: empty vocabulary")
    return dict(vocab)


def _check_line(w: Any) -> bool:
    """Whether ``w`` reads back as itself from a ``vocab.txt`` line."""
    return isinstance(w, str) and bool(w) and "\n" not in w and w.rstrip() == w


def write_vocab(words: Sequence[str], path: str | os.PathLike) -> str:
    """Write ``words`` as a ``vocab.txt`` (id = position). Returns the path.

    Raises ``ValueError`` for a repeated token, or one that would not read back as itself
    (containing a newline, or ending in whitespace).
    """
    for i, w in enumerate(words):
        if not _check_line(w):
            raise ValueError(f"token {i} ({w!r}) cannot be stored in a vocab.txt line")
    if len(set(words)) != len(words):
        raise ValueError(f"token {next(w for i, w in enumerate(words) if w in words[:i])!r} appears twice "
                         f"(ids must be unique)")
    path = os.fspath(path)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write("".join(w + "\n" for w in words))
    return path


def build_vocab(texts: Iterable[str], extra: Iterable[str] = (), *, do_lower_case: bool = True,
                strip_accents: bool | None = None, tokenize_chinese_chars: bool = True,
                ascii_chars: bool = True) -> list[str]:
    """A small WordPiece vocabulary covering ``texts`` (for tiny test models and toy worlds).

    Trained by ``tokenizers``' ``WordPieceTrainer`` (through the BERT normaliser and pre-tokenizer
    of these settings, printable ASCII added to the alphabet when ``ascii_chars``) with no size
    limit, so every word of ``texts`` ends up a whole token. Kept from it, in a fixed order:
    ``[PAD] [UNK] [CLS] [SEP] [MASK]`` (ids 0-4), the alphabet (sorted), each character's ``##``
    continuation (all of them, so any text over the alphabet tokenizes without [UNK]), then the
    learnt tokens that are whole words of ``texts`` (first-appearance order, at most 100
    characters), then ``extra`` (verbatim, e.g. ``"##ing"``). The intermediate sub-words of the
    merges are dropped: the trainer breaks ties between equally frequent pairs in hash order, so
    which of them it learns changes from run to run, and a toy vocabulary must be reproducible.
    """
    extra = list(extra)
    for w in extra:
        if not _check_line(w):
            raise ValueError(f"extra token {w!r} cannot be stored in a vocab.txt line")
    tok = _backend({"[UNK]": 0}, "[UNK]", do_lower_case, strip_accents, tokenize_chinese_chars)
    texts = list(texts)
    alphabet = sorted(set(tok.normalizer.normalize_str("".join(map(chr, range(33, 127))))) - {" "}) if ascii_chars else []
    # Enough room for every merge (each one shortens some word; vocab_size is preallocated).
    size = len(SPECIAL_TOKENS) + 2 * len(alphabet) + 3 * sum(len(t) for t in texts)
    trainer = trainers.WordPieceTrainer(vocab_size=size, min_frequency=0, show_progress=False,
                                        special_tokens=list(SPECIAL_TOKENS), initial_alphabet=alphabet,
                                        continuing_subword_prefix=CONTINUATION_PREFIX)
    tok.train_from_iterator(texts, trainer)
    learnt = tok.get_vocab(with_added_tokens=False)
    chars = sorted({t for t in learnt if len(t) == 1} - set(SPECIAL_TOKENS))
    words = [w for text in texts for w, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(text))
             if 1 < len(w) <= MAX_INPUT_CHARS_PER_WORD and w in learnt]
    out = [*SPECIAL_TOKENS, *chars, *(CONTINUATION_PREFIX + c for c in chars), *words, *extra]
    return list(dict.fromkeys(out))  # first occurrence of each token, in order


# ------------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------------

def _vocab_from_tokenizer_json(tok_json: dict, path: str) -> dict[str, int]:
    model = tok_json.get("model")
    if not isinstance(model, dict) or model.get("type") != "WordPiece":
        raise TokenizerFileError(f"{path}: not a WordPiece tokenizer.json (model.type must be 'WordPiece')")
    vocab = model.get("vocab")
    if isinstance(vocab, list):
        vocab = {(t[0] if isinstance(t, list) else t): i for i, t in enumerate(vocab)}
    if not isinstance(vocab, dict) or not vocab or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in vocab.items()):
        raise TokenizerFileError(f"{path}: model.vocab must map token strings to integer ids")
    return dict(vocab)


class BertTokenizer(_Wrapper):
    """BERT WordPiece tokenizer matching transformers 5.x ``BertTokenizer`` ids.

    Args:
        vocab: token -> id mapping, or a sequence of tokens (id = position).
        do_lower_case: lowercase (and, unless ``strip_accents`` says otherwise, strip accents).
        strip_accents: None = follow ``do_lower_case``.
        tokenize_chinese_chars: put spaces around CJK ideographs.
        model_max_length: the tokenizer config's value (kept for saving; :meth:`__call__` pads to
            :data:`ALIGN_MAX_LENGTH` unless given ``max_length``).
        unk_token, sep_token, pad_token, cls_token, mask_token: strings or ``{"content": ...}``
            dicts; a token missing from ``vocab`` gets the next free id, as in transformers.
        added_tokens: extra ``{"id", "content", "normalized", "special"}`` dicts (e.g. from a
            ``tokenizer_config.json`` ``added_tokens_decoder``).
        clean_up_tokenization_spaces: :meth:`decode`'s default (transformers 5 default: False).

    Attributes: ``vocab`` (the WordPiece vocabulary), ``added_tokens`` (content -> flags and id),
    ``backend`` (the ``tokenizers.Tokenizer``), and the arguments.
    """

    def __init__(
        self,
        vocab: Mapping[str, int] | Sequence[str],
        *,
        do_lower_case: bool = True,
        strip_accents: bool | None = None,
        tokenize_chinese_chars: bool = True,
        model_max_length: int = ALIGN_MAX_LENGTH,
        unk_token: str | dict | None = "[UNK]",
        sep_token: str | dict | None = "[SEP]",
        pad_token: str | dict | None = "[PAD]",
        cls_token: str | dict | None = "[CLS]",
        mask_token: str | dict | None = "[MASK]",
        added_tokens: Iterable[dict] = (),
        clean_up_tokenization_spaces: bool = False,
    ):
        if isinstance(vocab, Mapping):
            self.vocab: dict[str, int] = {str(k): int(v) for k, v in vocab.items()}
        else:
            self.vocab = {tok: i for i, tok in enumerate(vocab)}
        if not self.vocab:
            raise ValueError("empty vocabulary")
        self.do_lower_case = bool(do_lower_case)
        self.strip_accents = strip_accents
        self.tokenize_chinese_chars = bool(tokenize_chinese_chars)
        self.model_max_length = int(model_max_length)
        self.clean_up_tokenization_spaces = bool(clean_up_tokenization_spaces)
        self._set_specials(_SPECIAL_ATTRS, dict(zip(_SPECIAL_ATTRS, (unk_token, sep_token, pad_token, cls_token,
                                                                       mask_token))))
        if "unk_token" not in self._special_specs:
            raise ValueError("unk_token is required (WordPiece maps unknown words to it)")
        if "cls_token" not in self._special_specs or "sep_token" not in self._special_specs:
            raise ValueError("cls_token and sep_token are required ([CLS] $A [SEP])")
        self.backend = _backend(self.vocab, self.unk_token, self.do_lower_case, self.strip_accents,
                                self.tokenize_chinese_chars)
        self.added_tokens = _added_token_table(self.backend, added_tokens, self._special_specs)
        self.backend.post_processor = processors.TemplateProcessing(
            single=f"{self.cls_token}:0 $A:0 {self.sep_token}:0",
            pair=f"{self.cls_token}:0 $A:0 {self.sep_token}:0 $B:1 {self.sep_token}:1",
            special_tokens=[(self.cls_token, self.cls_token_id), (self.sep_token, self.sep_token_id)])

    # ------------------------------------------------------------------ loading / saving

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, subfolder: str | None = None,
                        **overrides: Any) -> "BertTokenizer":
        """Load a transformers BERT tokenizer folder.

        Reads ``vocab.txt`` (or, without it, the WordPiece vocabulary of a ``tokenizer.json``, which
        is all transformers 5's ``save_pretrained`` writes), ``tokenizer_config.json`` and
        ``special_tokens_map.json`` when present. ``path`` may also be a model root with a
        ``tokenizer/`` subfolder. ``overrides`` (``do_lower_case``, ``strip_accents``,
        ``tokenize_chinese_chars``, ``model_max_length``, special tokens) win over the files.

        Raises:
            FileNotFoundError: the folder, or both ``vocab.txt`` and ``tokenizer.json``, are
                missing (the message names the paths).
            TokenizerFileError: a file has invalid JSON or unexpected content (named).
        """
        overrides = dict(overrides)
        folder, config, specials, added, tok_json = _read_folder(path, subfolder, VOCAB_FILE, _SPECIAL_ATTRS, overrides)
        vocab_path, json_path = os.path.join(folder, VOCAB_FILE), os.path.join(folder, TOKENIZER_JSON_FILE)
        if os.path.exists(vocab_path):
            vocab = read_vocab(vocab_path)
        elif tok_json is not None:
            vocab = _vocab_from_tokenizer_json(tok_json, json_path)
        else:
            raise FileNotFoundError(f"tokenizer vocabulary not found: {vocab_path} (nor {json_path})")
        kwargs: dict[str, Any] = {**_DEFAULT_SPECIALS, **specials}
        where = os.path.join(folder, CONFIG_FILE)
        for key, default in (("do_lower_case", True), ("tokenize_chinese_chars", True)):
            kwargs[key] = overrides.pop(key, config.get(key, default))
            if not isinstance(kwargs[key], bool):
                raise TokenizerFileError(f"{where}: {key} must be true or false, got {kwargs[key]!r}")
        kwargs["strip_accents"] = overrides.pop("strip_accents", config.get("strip_accents"))
        if not (kwargs["strip_accents"] is None or isinstance(kwargs["strip_accents"], bool)):
            raise TokenizerFileError(f"{where}: strip_accents must be true, false or null, got {kwargs['strip_accents']!r}")
        kwargs["clean_up_tokenization_spaces"] = bool(
            overrides.pop("clean_up_tokenization_spaces", config.get("clean_up_tokenization_spaces", False)))
        kwargs["model_max_length"] = _max_length(
            overrides.pop("model_max_length", config.get("model_max_length")), ALIGN_MAX_LENGTH)
        if overrides:
            raise TypeError(f"unexpected keyword arguments: {sorted(overrides)}")
        try:
            return cls(vocab, added_tokens=added, **kwargs)
        except ValueError as e:
            raise TokenizerFileError(f"{folder}: {e}") from e

    def save_pretrained(self, path: str | os.PathLike) -> list[str]:
        """Write ``vocab.txt``, ``tokenizer_config.json`` and ``special_tokens_map.json``.

        The folder loads with identical ids in transformers' ``BertTokenizer`` (and
        ``BertTokenizerFast``) and in :meth:`from_pretrained`. Returns the paths written.
        """
        if sorted(self.vocab.values()) != list(range(len(self.vocab))):
            raise ValueError("vocabulary ids are not 0..N-1 without gaps; cannot write a vocab.txt")
        folder = os.fspath(path)
        os.makedirs(folder, exist_ok=True)
        paths = [write_vocab(sorted(self.vocab, key=self.vocab.__getitem__), os.path.join(folder, VOCAB_FILE))]
        config = {"clean_up_tokenization_spaces": self.clean_up_tokenization_spaces,
                  "do_lower_case": self.do_lower_case, "strip_accents": self.strip_accents,
                  "tokenize_chinese_chars": self.tokenize_chinese_chars, "tokenizer_class": "BertTokenizer"}
        return paths + _write_configs(folder, self, config, full_special_map=False)

    unk_token, unk_token_id = _special_properties("unk_token")
    sep_token, sep_token_id = _special_properties("sep_token")
    pad_token, pad_token_id = _special_properties("pad_token")
    cls_token, cls_token_id = _special_properties("cls_token")
    mask_token, mask_token_id = _special_properties("mask_token")

    @property
    def vocab_size(self) -> int:
        """Size of the WordPiece vocabulary (transformers' ``vocab_size``: added tokens excluded)."""
        return self.backend.get_vocab_size(with_added_tokens=False)

    @property
    def all_special_ids(self) -> list[int]:
        return sorted({s["id"] for s in self.added_tokens.values() if s["special"]})

    def __repr__(self) -> str:
        return (f"BertTokenizer(vocab_size={self.vocab_size}, do_lower_case={self.do_lower_case}, "
                f"strip_accents={self.strip_accents}, model_max_length={self.model_max_length})")

    # ------------------------------------------------------------------ encoding / decoding

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int]:
        if isinstance(tokens, str):
            i = self.backend.token_to_id(tokens)
            return self.unk_token_id if i is None else i
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | Iterable[int]) -> str | list[str]:
        if isinstance(ids, (int, np.integer)):
            return self.backend.id_to_token(int(ids))
        return [self.backend.id_to_token(int(i)) for i in ids]

    def __call__(
        self,
        texts: str | Sequence[str],
        max_length: int | None = None,
        padding: bool | str = "max_length",
        truncation: bool = True,
    ) -> dict[str, np.ndarray]:
        """Batch-encode like ``AlignProcessor(text=texts)`` / ``tokenizer(texts, padding=..., ...)``.

        ``texts``: a string or N strings; ``max_length`` defaults to :data:`ALIGN_MAX_LENGTH` (64,
        what ``AlignProcessor`` passes); ``padding``: ``"max_length"``, ``"longest"`` / ``True`` or
        ``False`` / ``"do_not_pad"`` (rows must then be equally long); ``truncation`` keeps [CLS],
        the first ``max_length - 2`` tokens and [SEP]. ``AlignProcessor`` does *not* truncate;
        ``truncation=False`` reproduces it: rows stay whole and, for ``padding="max_length"``, all are
        padded to ``max(max_length, longest row)``. Returns ``{"input_ids", "attention_mask",
        "token_type_ids"}``, int32 (N, L), right-padded with ``pad_token_id`` (mask 0), types 0.
        """
        if max_length is None:
            max_length = ALIGN_MAX_LENGTH
        pad, pad_id = (self.pad_token, self.pad_token_id) if self.pad_token is not None else ("[PAD]", 0)
        input_ids, attention_mask, token_type_ids = batch_encode(
            self.backend, texts, pad_id=pad_id, pad_token=pad, max_length=max_length, padding=padding,
            truncation=truncation, overlong="extend")
        return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}

    def decode(self, ids: Iterable[int] | np.ndarray, skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool | None = None) -> str:
        """Text of a 1-D id sequence, like transformers' ``decode``.

        The library's WordPiece decoder (tokens joined with spaces, ``##`` pieces glued, unknown
        ids skipped); ``clean_up_tokenization_spaces`` (default: the config's) additionally applies
        transformers' ``clean_up_tokenization``.
        """
        text = self._decode(ids, skip_special_tokens)
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        if clean_up_tokenization_spaces:
            for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                         (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
                text = text.replace(a, b)
        return text
