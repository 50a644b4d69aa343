"""Pure-Python BERT WordPiece tokenizer (the text tokenizer of ALIGN, ``kakaobrain/align-base``).

No transformers / torch / tokenizers import: only the standard library and ``numpy``.
:meth:`BertTokenizer.from_pretrained` reads a transformers tokenizer folder (``vocab.txt`` or the
``tokenizer.json`` transformers 5 writes instead, plus ``tokenizer_config.json`` /
``special_tokens_map.json``); :meth:`BertTokenizer.save_pretrained` writes a folder that
transformers' ``BertTokenizer`` (= ``BertTokenizerFast``) loads with identical ids.
:func:`build_vocab` / :func:`write_vocab` make small vocabularies for tiny test models.

Behaviour mirrored: transformers 5.x ``BertTokenizer``
-----------------------------------------------------
transformers >= 5 has one BERT tokenizer backed by HuggingFace ``tokenizers`` (``BertTokenizerFast``
is an alias; the old pure-Python class survives as ``BertTokenizerLegacy`` and is not what
``AutoTokenizer`` / ``AlignProcessor`` use). Its pipeline, reproduced here:

1. **Added / special tokens** ([PAD], [UNK], [CLS], [SEP], [MASK] and any ``added_tokens_decoder``
   entries) are split out of the *raw* text first (case-sensitive, leftmost-longest) and map straight
   to their id: ``"a [MASK]b"`` -> ``a [MASK] b`` but ``"[mask]"`` -> ``[ mask ]``. A token flagged
   ``normalized: true`` is matched in the normalised text instead (its content normalised too).
2. **BertNormalizer**, in this order: *clean text* (drop U+0000, U+FFFD and control / format /
   private-use characters (Cc, Cf, Co; not unassigned ones) except ``\\t \\n \\r``; map the
   other Unicode ``White_Space`` characters to a space); *CJK*
   (spaces around CJK ideographs, so each is a word); *strip accents* (NFD, then drop category Mn)
   when ``strip_accents`` is true, or is unset and ``do_lower_case`` is true; *lowercase*
   (per character, Rust ``char::to_lowercase``: no Greek final-sigma rule). No NFC step.
3. **BertPreTokenizer**: split on whitespace (dropped) and around every punctuation character (ASCII
   ``!"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~`` and Unicode categories P*), each one its own word.
   So a DreamBooth identifier ``"[V]"`` is three words ``[``, ``v``, ``]``.
4. **WordPiece**: per word, greedy longest-match-first over the vocabulary, continuation pieces
   prefixed ``##``; a word with more than 100 characters, or with any part that matches nothing,
   becomes one ``[UNK]``.
5. ``[CLS] + tokens + [SEP]``; ``truncation`` keeps the first ``max_length - 2`` tokens; padding
   with ``[PAD]`` on the right; ``token_type_ids`` all 0 (single sequences).

**Default length.** ``AlignProcessor`` (transformers 5.24) tokenizes with ``padding="max_length",
max_length=64`` whatever the tokenizer's own ``model_max_length`` says, so :meth:`__call__` pads to
:data:`ALIGN_MAX_LENGTH` = 64 unless given ``max_length``. The processor sets no truncation, though:
a prompt of more than 62 word pieces comes back longer than 64 there (and a batch mixing such a
prompt with shorter ones cannot become a tensor). :meth:`__call__` truncates by default (fixed
shapes); ``truncation=False`` reproduces the processor.

**Loading** follows transformers 5: ``do_lower_case`` (default true), ``strip_accents`` (default
null), ``tokenize_chinese_chars`` (default true) come from ``tokenizer_config.json`` only; a
``tokenizer.json`` contributes just its vocabulary (transformers rebuilds the normaliser from the
config keywords and ignores the one stored in tokenizer.json). ``vocab.txt`` lines are read like
the Rust ``WordPiece.read_file``: split on ``\\n``, trailing whitespace trimmed, id = line number
(a repeated token keeps its last line).

Known remaining differences
---------------------------
* Character classes (control / punctuation / non-spacing mark) are tables read off tokenizers 0.23
  (its ``unicode_categories`` crate has Unicode 8-9 era data, unlike Python's ``unicodedata``), so
  they match on every Python version. NFD and lowercasing use Python's ``unicodedata`` (Unicode
  14.0 on Python 3.11) where tokenizers uses newer Rust tables. A sweep of all 1,112,064 code
  points (four lowercase / strip_accents settings, transformers 5.24, Python 3.11) found 56
  differences: 55 code points unassigned in Unicode 14 that Rust lowercases (U+1C89, U+A7CB..,
  U+10D50.., U+16EA0..) and U+11938, which Python's NFD decomposes and tokenizers' does not.
* ``lstrip`` / ``rstrip`` flags of added tokens are ignored: they only absorb whitespace, which the
  BERT pre-tokenizer drops anyway, so ids cannot change. ``single_word`` is ignored (BERT's special
  tokens never set it).
* Versus transformers 4.x's slow ``BertTokenizer`` (``BertTokenizerLegacy`` in 5.x, measured):
  that one NFC-normalises first (cased ``"cafe\\u0301"`` is the word ``café`` there, ``cafe`` +
  U+0301 here), uses Python's current Unicode categories (drops unassigned code points, splits
  U+061D as punctuation) and lowercases with ``str.lower`` (final sigma: ``"ΟΔΟΣ"`` -> ``οδος``
  there, ``οδοσ`` here). Plain prompts give the same ids everywhere.
"""
from __future__ import annotations

import bisect
import json
import os
import unicodedata
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

# Shared with the CLIP tokenizer: file reading, special-token specs, Rust-style lowercasing.
from rpo_jax.sd.tokenizer import TokenizerFileError, _lowercase, _read_json, _token_spec, batch_encode

__all__ = ["BertTokenizer", "TokenizerFileError", "build_vocab", "write_vocab", "read_vocab",
           "basic_tokenize", "ALIGN_MAX_LENGTH", "SPECIAL_TOKENS"]

VOCAB_FILE = "vocab.txt"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
TOKENIZER_JSON_FILE = "tokenizer.json"

ALIGN_MAX_LENGTH = 64  # AlignProcessor's text_kwargs: padding="max_length", max_length=64
MAX_INPUT_CHARS_PER_WORD = 100
CONTINUATION_PREFIX = "##"
# build_vocab's first five ids, as in BERT's vocab (pad 0) and transformers' default BertTokenizer.
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_SPECIAL_ATTRS = ("unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_DEFAULT_SPECIALS = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]",
                     "cls_token": "[CLS]", "mask_token": "[MASK]"}

# ------------------------------------------------------------------------------------------------
# Character classes (tokenizers' bert normaliser / pre-tokenizer)
# ------------------------------------------------------------------------------------------------

# Unicode White_Space (Rust ``char::is_whitespace``); str.isspace() also accepts U+001C..U+001F.
_WHITE_SPACE = frozenset(
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009"
    "\u200a\u2028\u2029\u202f\u205f\u3000")

# CJK ideograph blocks of tokenizers' ``is_chinese_char`` (= Google BERT's list).
_CJK_RANGES = (
    (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F), (0x2B920, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F),
)


def _ranges(spec: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``"21-2F 3A ..."`` (hex code points / inclusive ranges) -> (sorted starts, ends) for bisect."""
    starts, ends = [], []
    for item in spec.split():
        lo, _, hi = item.partition("-")
        starts.append(int(lo, 16))
        ends.append(int(hi or lo, 16))
    return tuple(starts), tuple(ends)


def _in(table: tuple[tuple[int, ...], tuple[int, ...]], cp: int) -> bool:
    i = bisect.bisect_right(table[0], cp) - 1
    return i >= 0 and cp <= table[1][i]


# The character classes of tokenizers' BertNormalizer / BertPreTokenizer, read off tokenizers 0.23
# by probing every code point (they come from the ``unicode_categories`` crate, whose tables are
# Unicode 8-9 era, so they differ from Python's ``unicodedata`` for ~500 code points: e.g. U+061D
# (Po since Unicode 14) is no punctuation there, U+166D (So since Unicode 12) still is, U+08D4..
# U+08E1 (Mn since Unicode 9) are not stripped as accents, and unassigned code points are kept).
# Removed by clean_text: U+0000, U+FFFD and categories Cc/Cf/Co except \t \n \r (White_Space
# characters that are Cc, i.e. \x0b \x0c \x85, are removed too, not turned into spaces).
_CONTROL = _ranges("""
0-8 B-C E-1F 7F-9F AD 600-605 61C 6DD 70F 180E 200B-200F 202A-202E 2060-2064 2066-206F E000-F8FF
FEFF FFF9-FFFB FFFD 110BD 1BCA0-1BCA3 1D173-1D17A E0001 E0020-E007F F0000-FFFFD 100000-10FFFD
""")
# Split off as single-character words: ASCII punctuation and categories P*.
_PUNCT = _ranges("""
21-2F 3A-40 5B-60 7B-7E A1 A7 AB B6-B7 BB BF 37E 387 55A-55F 589-58A 5BE 5C0 5C3 5C6 5F3-5F4
609-60A 60C-60D 61B 61E-61F 66A-66D 6D4 700-70D 7F7-7F9 830-83E 85E 964-965 970 AF0 DF4 E4F
E5A-E5B F04-F12 F14 F3A-F3D F85 FD0-FD4 FD9-FDA 104A-104F 10FB 1360-1368 1400 166D-166E
169B-169C 16EB-16ED 1735-1736 17D4-17D6 17D8-17DA 1800-180A 1944-1945 1A1E-1A1F 1AA0-1AA6
1AA8-1AAD 1B5A-1B60 1BFC-1BFF 1C3B-1C3F 1C7E-1C7F 1CC0-1CC7 1CD3 2010-2027 2030-2043 2045-2051
2053-205E 207D-207E 208D-208E 2308-230B 2329-232A 2768-2775 27C5-27C6 27E6-27EF 2983-2998
29D8-29DB 29FC-29FD 2CF9-2CFC 2CFE-2CFF 2D70 2E00-2E2E 2E30-2E42 3001-3003 3008-3011 3014-301F
3030 303D 30A0 30FB A4FE-A4FF A60D-A60F A673 A67E A6F2-A6F7 A874-A877 A8CE-A8CF A8F8-A8FA A8FC
A92E-A92F A95F A9C1-A9CD A9DE-A9DF AA5C-AA5F AADE-AADF AAF0-AAF1 ABEB FD3E-FD3F FE10-FE19
FE30-FE52 FE54-FE61 FE63 FE68 FE6A-FE6B FF01-FF03 FF05-FF0A FF0C-FF0F FF1A-FF1B FF1F-FF20
FF3B-FF3D FF3F FF5B FF5D FF5F-FF65 10100-10102 1039F 103D0 1056F 10857 1091F 1093F 10A50-10A58
10A7F 10AF0-10AF6 10B39-10B3F 10B99-10B9C 11047-1104D 110BB-110BC 110BE-110C1 11140-11143
11174-11175 111C5-111C9 111CD 111DB 111DD-111DF 11238-1123D 112A9 114C6 115C1-115D7 11641-11643
1173C-1173E 12470-12474 16A6E-16A6F 16AF5 16B37-16B3B 16B44 1BC9F 1DA87-1DA8B
""")
# Dropped after NFD by strip_accents: category Mn.
_MARK_NONSPACING = _ranges("""
300-33F 342 345-36F 483-487 591-5BD 5BF 5C1-5C2 5C4-5C5 5C7 610-61A 64B-65F 670 6D6-6DC 6DF-6E4
6E7-6E8 6EA-6ED 711 730-74A 7A6-7B0 7EB-7F3 816-819 81B-823 825-827 829-82D 859-85B 8E3-902 93A
93C 941-948 94D 951-957 962-963 981 9BC 9C1-9C4 9CD 9E2-9E3 A01-A02 A3C A41-A42 A47-A48 A4B-A4D
A51 A70-A71 A75 A81-A82 ABC AC1-AC5 AC7-AC8 ACD AE2-AE3 B01 B3C B3F B41-B44 B4D B56 B62-B63 B82
BC0 BCD C00 C3E-C40 C46-C47 C4A-C4D C55-C56 C62-C63 C81 CBC CBF CC6 CCC-CCD CE2-CE3 D01 D41-D44
D4D D62-D63 DCA DD2-DD4 DD6 E31 E34-E3A E47-E4E EB1 EB4-EB9 EBB-EBC EC8-ECD F18-F19 F35 F37 F39
F71-F72 F74 F77 F79-F7E F80 F82-F84 F86-F87 F8D-F92 F94-F97 F99-F9C F9E-FA1 FA3-FA6 FA8-FAB
FAD-FB8 FBA-FBC FC6 102D-1030 1032-1037 1039-103A 103D-103E 1058-1059 105E-1060 1071-1074 1082
1085-1086 108D 109D 135D-135F 1712-1714 1732-1734 1752-1753 1772-1773 17B4-17B5 17B7-17BD 17C6
17C9-17D3 17DD 180B-180D 18A9 1920-1922 1927-1928 1932 1939-193B 1A17-1A18 1A1B 1A56 1A58-1A5E
1A60 1A62 1A65-1A6C 1A73-1A7C 1A7F 1AB0-1ABD 1B00-1B03 1B34 1B36-1B3A 1B3C 1B42 1B6B-1B73
1B80-1B81 1BA2-1BA5 1BA8-1BA9 1BAB-1BAD 1BE6 1BE8-1BE9 1BED 1BEF-1BF1 1C2C-1C33 1C36-1C37
1CD0-1CD2 1CD4-1CE0 1CE2-1CE8 1CED 1CF4 1CF8-1CF9 1DC0-1DF5 1DFC-1DFF 20D0-20DC 20E1 20E5-20F0
2CEF-2CF1 2D7F 2DE0-2DFF 302A-302D 3099-309A A66F A674-A67D A69E-A69F A6F0-A6F1 A802 A806 A80B
A825-A826 A8C4 A8E0-A8F1 A926-A92D A947-A951 A980-A982 A9B3 A9B6-A9B9 A9BC A9E5 AA29-AA2E
AA31-AA32 AA35-AA36 AA43 AA4C AA7C AAB0 AAB2-AAB4 AAB7-AAB8 AABE-AABF AAC1 AAEC-AAED AAF6 ABE5
ABE8 ABED FB1E FE00-FE0F FE20-FE2F 101FD 102E0 10376-1037A 10A01-10A03 10A05-10A06 10A0C-10A0F
10A38-10A3A 10A3F 10AE5-10AE6 11001 11038-11046 1107F-11081 110B3-110B6 110B9-110BA 11100-11102
11127-1112B 1112D 11130-11134 11173 11180-11181 111B6-111BE 111CA-111CC 1122F-11231 11234
11236-11237 112DF 112E3-112EA 11300-11301 1133C 11340 11366-1136C 11370-11374 114B3-114B8 114BA
114BF-114C0 114C2-114C3 115B2-115B5 115BC-115BD 115BF-115C0 115DC-115DD 11633-1163A 1163D
1163F-11640 116AB 116AD 116B0-116B5 116B7 1171D-1171F 11722-11725 11727-1172B 16AF0-16AF4
16B30-16B36 16F8F-16F92 1BC9D-1BC9E 1D167-1D169 1D17B-1D182 1D185-1D18B 1D1AA-1D1AD 1D242-1D244
1DA00-1DA36 1DA3B-1DA6C 1DA75 1DA84 1DA9B-1DA9F 1DAA1-1DAAF 1E8D0-1E8D6 E0100-E01EF
""")


def _is_cjk(cp: int) -> bool:
    for lo, hi in _CJK_RANGES:
        if lo <= cp <= hi:
            return True
    return False


def _is_punctuation(c: str) -> bool:
    return _in(_PUNCT, ord(c))


def normalize(text: str, *, lowercase: bool = True, strip_accents: bool | None = None,
              tokenize_chinese_chars: bool = True) -> str:
    """tokenizers' ``BertNormalizer(clean_text=True, ...)`` applied to ``text``."""
    out = []
    for c in text:
        cp = ord(c)
        if _in(_CONTROL, cp):
            continue
        if c in _WHITE_SPACE:
            out.append(" ")
        elif tokenize_chinese_chars and _is_cjk(cp):
            out.append(" " + c + " ")
        else:
            out.append(c)
    text = "".join(out)
    if strip_accents if strip_accents is not None else lowercase:
        text = "".join(c for c in unicodedata.normalize("NFD", text)
                       if not _in(_MARK_NONSPACING, ord(c)))
    if lowercase:
        text = _lowercase(text)
    return text


def pre_tokenize(text: str) -> list[str]:
    """tokenizers' ``BertPreTokenizer``: split on whitespace (dropped) and around punctuation."""
    words: list[str] = []
    current: list[str] = []
    for c in text:
        if c in _WHITE_SPACE:
            if current:
                words.append("".join(current))
                current = []
        elif _is_punctuation(c):
            if current:
                words.append("".join(current))
                current = []
            words.append(c)
        else:
            current.append(c)
    if current:
        words.append("".join(current))
    return words


def basic_tokenize(text: str, *, do_lower_case: bool = True, strip_accents: bool | None = None,
                   tokenize_chinese_chars: bool = True) -> list[str]:
    """The words WordPiece sees: :func:`normalize` then :func:`pre_tokenize` (no added tokens)."""
    return pre_tokenize(normalize(text, lowercase=do_lower_case, strip_accents=strip_accents,
                                  tokenize_chinese_chars=tokenize_chinese_chars))


# ------------------------------------------------------------------------------------------------
# Vocabulary files
# ------------------------------------------------------------------------------------------------

def _rstrip_white(s: str) -> str:
    """Rust ``str::trim_end`` (Unicode White_Space)."""
    end = len(s)
    while end and s[end - 1] in _WHITE_SPACE:
        end -= 1
    return s[:end]


def read_vocab(path: str | os.PathLike) -> dict[str, int]:
    """token -> id from a ``vocab.txt`` (one token a line, id = line number).

    Read like tokenizers' ``WordPiece.read_file``: lines split on ``\\n``, trailing whitespace
    (``\\r`` included) trimmed, a repeated token keeps its last line number.
    Raises ``FileNotFoundError`` naming the path, ``TokenizerFileError`` for non-UTF-8 content.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer vocabulary not found: {path}")
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TokenizerFileError(f"{path}: not UTF-8 text ({e})") from e
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    vocab: dict[str, int] = {}
    for i, line in enumerate(lines):
        vocab[_rstrip_white(line)] = i
    if not vocab:
        raise TokenizerFileError(f"{path}: empty vocabulary")
    return vocab


def write_vocab(words: Sequence[str], path: str | os.PathLike) -> str:
    """Write ``words`` as a ``vocab.txt`` (id = position). Returns the path.

    Raises ``ValueError`` for a repeated token, or one that would not read back as itself
    (containing a newline, or ending in whitespace).
    """
    seen: set[str] = set()
    for i, w in enumerate(words):
        if not isinstance(w, str) or not w or "\n" in w or _rstrip_white(w) != w:
            raise ValueError(f"token {i} ({w!r}) cannot be stored in a vocab.txt line")
        if w in seen:
            raise ValueError(f"token {w!r} appears twice (ids must be unique)")
        seen.add(w)
    path = os.fspath(path)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write("".join(w + "\n" for w in words))
    return path


def build_vocab(texts: Iterable[str], extra: Iterable[str] = (), *, do_lower_case: bool = True,
                strip_accents: bool | None = None, tokenize_chinese_chars: bool = True,
                ascii_chars: bool = True) -> list[str]:
    """A small WordPiece vocabulary covering ``texts`` (for tiny test models and toy worlds).

    Order: ``[PAD] [UNK] [CLS] [SEP] [MASK]`` (ids 0-4), then every character (printable ASCII too
    when ``ascii_chars``, so any ASCII prompt tokenizes without [UNK]), then each character's ``##``
    continuation, then the whole words of ``texts`` (first-appearance order), then ``extra``
    (tokens taken verbatim, e.g. ``"##ing"``). Characters and words are the normalised ones, so
    tokenize with the same ``do_lower_case`` / ``strip_accents`` / ``tokenize_chinese_chars``.
    """
    kw = dict(do_lower_case=do_lower_case, strip_accents=strip_accents,
              tokenize_chinese_chars=tokenize_chinese_chars)
    words: list[str] = []
    chars: set[str] = set()
    if ascii_chars:
        for c in map(chr, range(33, 127)):
            chars.update(normalize(c, lowercase=do_lower_case, strip_accents=strip_accents,
                                   tokenize_chinese_chars=tokenize_chinese_chars))
    for text in texts:
        for w in basic_tokenize(text, **kw):
            chars.update(w)
            if len(w) > 1 and len(w) <= MAX_INPUT_CHARS_PER_WORD:
                words.append(w)
    chars.discard(" ")
    out = list(SPECIAL_TOKENS)
    ordered_chars = sorted(chars)
    out += ordered_chars
    out += [CONTINUATION_PREFIX + c for c in ordered_chars]
    out += words
    for w in extra:
        if not isinstance(w, str) or not w or "\n" in w or _rstrip_white(w) != w:
            raise ValueError(f"extra token {w!r} cannot be stored in a vocab.txt line")
        out.append(w)
    seen: set[str] = set()
    unique = []
    for w in out:
        if w not in seen:
            seen.add(w)
            unique.append(w)
    return unique


# ------------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------------

def _as_bool_or_none(value: Any, where: str) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    raise TokenizerFileError(f"{where}: expected true, false or null, got {value!r}")


class BertTokenizer:
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
            self.vocab = {}
            for i, tok in enumerate(vocab):
                self.vocab[tok] = i
        if not self.vocab:
            raise ValueError("empty vocabulary")
        self.do_lower_case = bool(do_lower_case)
        self.strip_accents = strip_accents
        self.tokenize_chinese_chars = bool(tokenize_chinese_chars)
        self.model_max_length = int(model_max_length)
        self.clean_up_tokenization_spaces = bool(clean_up_tokenization_spaces)
        self._wp_cache: dict[str, list[int]] = {}

        self._special_specs: dict[str, dict] = {}
        for attr, value in zip(_SPECIAL_ATTRS, (unk_token, sep_token, pad_token, cls_token, mask_token)):
            spec = _token_spec(value, attr, special=True)
            if spec is not None:
                spec["special"] = True
                self._special_specs[attr] = spec
        if "unk_token" not in self._special_specs:
            raise ValueError("unk_token is required (WordPiece maps unknown words to it)")

        # Added-token table: explicit added tokens (by id), then special tokens not yet in it.
        self.encoder: dict[str, int] = dict(self.vocab)
        self.added_tokens: dict[str, dict] = {}
        for tok in sorted(added_tokens, key=lambda t: t["id"]):
            tok = dict(tok)
            content = tok["content"]
            if content in self.encoder and self.encoder[content] != tok["id"]:
                raise ValueError(f"added token {content!r} has id {tok['id']} but the vocabulary "
                                 f"says {self.encoder[content]}")
            self.encoder[content] = tok["id"]
            self.added_tokens[content] = tok
        for attr in _SPECIAL_ATTRS:  # transformers' order: it decides the ids of missing ones
            spec = self._special_specs.get(attr)
            if spec is None:
                continue
            content = spec["content"]
            if content in self.added_tokens:
                self.added_tokens[content]["special"] = True
                continue
            if content not in self.encoder:
                # tokenizers' AddedVocabulary: the next id after the added tokens, or vocab_size
                # (the number of distinct vocab.txt tokens, which a file with repeated lines
                # makes smaller than its line count, so the id can then collide, as there).
                top = max((self.encoder[t] for t in self.added_tokens), default=None)
                self.encoder[content] = top + 1 if top is not None and top >= len(self.vocab) else len(self.vocab)
            self.added_tokens[content] = {"id": self.encoder[content], **spec}
        self.decoder: dict[int, str] = {}
        for tok, i in self.vocab.items():
            self.decoder[i] = tok
        for tok, spec in self.added_tokens.items():
            # tokenizers names a normalized added token by its normalised content ("SksTok" ->
            # "skstok" when lowercasing) in tokens and decoded text; get_vocab keeps the original.
            self.decoder[self.encoder[tok]] = self._normalize(tok) if spec["normalized"] else tok
        self._raw_tokens = sorted((t for t, s in self.added_tokens.items() if t and not s["normalized"]),
                                  key=len, reverse=True)
        self._norm_tokens: dict[str, str] = {}
        for t, s in self.added_tokens.items():
            if t and s["normalized"]:
                n = self._normalize(t)
                if n:
                    self._norm_tokens.setdefault(n, t)
        self._norm_token_list = sorted(self._norm_tokens, key=len, reverse=True)

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
        folder = os.fspath(path)
        if subfolder:
            folder = os.path.join(folder, subfolder)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"tokenizer folder not found: {folder}")
        if (subfolder is None
                and not os.path.exists(os.path.join(folder, VOCAB_FILE))
                and not os.path.exists(os.path.join(folder, TOKENIZER_JSON_FILE))
                and os.path.isdir(os.path.join(folder, "tokenizer"))):
            folder = os.path.join(folder, "tokenizer")

        def p(name: str) -> str:
            return os.path.join(folder, name)

        if os.path.exists(p(VOCAB_FILE)):
            vocab = read_vocab(p(VOCAB_FILE))
        elif os.path.exists(p(TOKENIZER_JSON_FILE)):
            vocab = cls._vocab_from_tokenizer_json(p(TOKENIZER_JSON_FILE))
        else:
            raise FileNotFoundError(
                f"tokenizer vocabulary not found: {p(VOCAB_FILE)} (nor {p(TOKENIZER_JSON_FILE)})")

        config: dict[str, Any] = {}
        if os.path.exists(p(CONFIG_FILE)):
            config = _read_json(p(CONFIG_FILE))
            if not isinstance(config, dict):
                raise TokenizerFileError(f"{p(CONFIG_FILE)}: expected a JSON object")
        specials: dict[str, Any] = {}
        for k in _SPECIAL_ATTRS:
            if k in config:
                _token_spec(config[k], f"{p(CONFIG_FILE)}: {k}", special=True)
                specials[k] = config[k]
        added: dict[int, dict] = {}
        if "added_tokens_decoder" in config:
            atd = config["added_tokens_decoder"]
            if not isinstance(atd, dict):
                raise TokenizerFileError(f"{p(CONFIG_FILE)}: added_tokens_decoder must be an object")
            for idx, tok in atd.items():
                where = f"{p(CONFIG_FILE)}: added_tokens_decoder[{idx!r}]"
                try:
                    i = int(idx)
                except ValueError:
                    raise TokenizerFileError(f"{where}: not an integer id") from None
                added[i] = {"id": i, **_token_spec(tok, where, special=False)}
        elif os.path.exists(p(SPECIAL_TOKENS_MAP_FILE)):
            stm = _read_json(p(SPECIAL_TOKENS_MAP_FILE))
            if not isinstance(stm, dict):
                raise TokenizerFileError(f"{p(SPECIAL_TOKENS_MAP_FILE)}: expected a JSON object")
            for k in _SPECIAL_ATTRS:
                if k in stm:
                    _token_spec(stm[k], f"{p(SPECIAL_TOKENS_MAP_FILE)}: {k}", special=True)
                    specials[k] = stm[k]
        for k in _SPECIAL_ATTRS:
            if k in overrides:
                specials[k] = overrides.pop(k)
        # A special token that is also an explicit added token takes that token's flags.
        by_content = {t["content"]: t for t in added.values()}
        for k, v in list(specials.items()):
            spec = _token_spec(v, f"{folder}: {k}", special=True)
            if spec is not None and spec["content"] in by_content:
                specials[k] = {**by_content[spec["content"]], "special": True}

        kwargs: dict[str, Any] = dict(_DEFAULT_SPECIALS)
        kwargs.update(specials)
        where = p(CONFIG_FILE)
        for key, default in (("do_lower_case", True), ("tokenize_chinese_chars", True)):
            value = overrides.pop(key, config.get(key, default))
            if not isinstance(value, bool):
                raise TokenizerFileError(f"{where}: {key} must be true or false, got {value!r}")
            kwargs[key] = value
        kwargs["strip_accents"] = _as_bool_or_none(
            overrides.pop("strip_accents", config.get("strip_accents")), f"{where}: strip_accents")
        kwargs["clean_up_tokenization_spaces"] = bool(
            overrides.pop("clean_up_tokenization_spaces", config.get("clean_up_tokenization_spaces", False)))
        mml = overrides.pop("model_max_length", config.get("model_max_length", ALIGN_MAX_LENGTH))
        if isinstance(mml, bool) or not isinstance(mml, (int, float)) or mml > 1e9 or mml < 2:
            mml = ALIGN_MAX_LENGTH  # unset (transformers' 1e30 sentinel) or unusable
        kwargs["model_max_length"] = int(mml)
        if overrides:
            raise TypeError(f"unexpected keyword arguments: {sorted(overrides)}")
        try:
            return cls(vocab, added_tokens=list(added.values()), **kwargs)
        except ValueError as e:
            raise TokenizerFileError(f"{folder}: {e}") from e

    @staticmethod
    def _vocab_from_tokenizer_json(path: str) -> dict[str, int]:
        tok_json = _read_json(path)
        model = tok_json.get("model") if isinstance(tok_json, dict) else None
        if not isinstance(model, dict) or model.get("type") != "WordPiece":
            raise TokenizerFileError(f"{path}: not a WordPiece tokenizer.json (model.type must be 'WordPiece')")
        vocab = model.get("vocab")
        if isinstance(vocab, list):
            vocab = {(t[0] if isinstance(t, list) else t): i for i, t in enumerate(vocab)}
        if not isinstance(vocab, dict) or not vocab or not all(
                isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in vocab.items()):
            raise TokenizerFileError(f"{path}: model.vocab must map token strings to integer ids")
        return dict(vocab)

    def save_pretrained(self, path: str | os.PathLike) -> list[str]:
        """Write ``vocab.txt``, ``tokenizer_config.json`` and ``special_tokens_map.json``.

        The folder loads with identical ids in transformers' ``BertTokenizer`` (and
        ``BertTokenizerFast``) and in :meth:`from_pretrained`. Returns the paths written.
        """
        ids = sorted(self.vocab.values())
        if ids != list(range(len(ids))):
            raise ValueError("vocabulary ids are not 0..N-1 without gaps; cannot write a vocab.txt")
        folder = os.fspath(path)
        os.makedirs(folder, exist_ok=True)
        paths = [os.path.join(folder, n) for n in (VOCAB_FILE, CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE)]
        write_vocab([t for t, _ in sorted(self.vocab.items(), key=lambda kv: kv[1])], paths[0])

        def full(tok: dict) -> dict:
            return {"content": tok["content"], "lstrip": False, "normalized": bool(tok["normalized"]),
                    "rstrip": False, "single_word": False, "special": bool(tok["special"])}

        config: dict[str, Any] = {
            "added_tokens_decoder": {
                str(self.encoder[t]): full(s)
                for t, s in sorted(self.added_tokens.items(), key=lambda kv: self.encoder[kv[0]])
            },
            "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces,
            "do_lower_case": self.do_lower_case,
            "model_max_length": self.model_max_length,
            "strip_accents": self.strip_accents,
            "tokenize_chinese_chars": self.tokenize_chinese_chars,
            "tokenizer_class": "BertTokenizer",
        }
        stm: dict[str, Any] = {}
        for attr, spec in self._special_specs.items():
            config[attr] = spec["content"]
            stm[attr] = spec["content"]
        config = dict(sorted(config.items()))
        with open(paths[1], "w", encoding="utf-8", newline="\n") as f:
            f.write(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        with open(paths[2], "w", encoding="utf-8", newline="\n") as f:
            f.write(json.dumps(dict(sorted(stm.items())), indent=2, ensure_ascii=False) + "\n")
        return paths

    # ------------------------------------------------------------------ properties

    def _special_str(self, attr: str) -> str | None:
        spec = self._special_specs.get(attr)
        return None if spec is None else spec["content"]

    def _special_id(self, attr: str) -> int | None:
        spec = self._special_specs.get(attr)
        return None if spec is None else self.encoder[spec["content"]]

    unk_token = property(lambda self: self._special_str("unk_token"))
    sep_token = property(lambda self: self._special_str("sep_token"))
    pad_token = property(lambda self: self._special_str("pad_token"))
    cls_token = property(lambda self: self._special_str("cls_token"))
    mask_token = property(lambda self: self._special_str("mask_token"))
    unk_token_id = property(lambda self: self._special_id("unk_token"))
    sep_token_id = property(lambda self: self._special_id("sep_token"))
    pad_token_id = property(lambda self: self._special_id("pad_token"))
    cls_token_id = property(lambda self: self._special_id("cls_token"))
    mask_token_id = property(lambda self: self._special_id("mask_token"))

    @property
    def vocab_size(self) -> int:
        """Size of the WordPiece vocabulary (transformers' ``vocab_size``: added tokens excluded)."""
        return len(self.vocab)

    def __len__(self) -> int:
        """Number of distinct tokens including added ones (transformers' ``len(tokenizer)``)."""
        return len(self.encoder)

    def get_vocab(self) -> dict[str, int]:
        return dict(self.encoder)

    @property
    def all_special_ids(self) -> list[int]:
        return sorted({self.encoder[t] for t, s in self.added_tokens.items() if s["special"]})

    def __repr__(self) -> str:
        return (f"BertTokenizer(vocab_size={self.vocab_size}, do_lower_case={self.do_lower_case}, "
                f"strip_accents={self.strip_accents}, model_max_length={self.model_max_length})")

    # ------------------------------------------------------------------ encoding

    def _normalize(self, text: str) -> str:
        return normalize(text, lowercase=self.do_lower_case, strip_accents=self.strip_accents,
                         tokenize_chinese_chars=self.tokenize_chinese_chars)

    @staticmethod
    def _split(text: str, tokens: Sequence[str]) -> list[tuple[str, bool]]:
        """Split ``text`` around leftmost-longest occurrences of ``tokens``: ``[(piece, is_token)]``."""
        if not tokens or not text:
            return [(text, False)] if text else []
        firsts = {t[0] for t in tokens}
        out: list[tuple[str, bool]] = []
        pos = start = 0
        n = len(text)
        while pos < n:
            if text[pos] in firsts:
                match = next((t for t in tokens if text.startswith(t, pos)), None)  # longest first
                if match is not None:
                    if pos > start:
                        out.append((text[start:pos], False))
                    out.append((match, True))
                    pos += len(match)
                    start = pos
                    continue
            pos += 1
        if start < n:
            out.append((text[start:], False))
        return out

    def _wordpiece(self, word: str) -> list[int]:
        ids = self._wp_cache.get(word)
        if ids is not None:
            return ids
        vocab = self.vocab
        if len(word) > MAX_INPUT_CHARS_PER_WORD:
            ids = [self.unk_token_id]
        else:
            ids = []
            start, n = 0, len(word)
            while start < n:
                end = n
                found = None
                while start < end:
                    piece = word[start:end] if start == 0 else CONTINUATION_PREFIX + word[start:end]
                    found = vocab.get(piece)
                    if found is not None:
                        break
                    end -= 1
                if found is None:
                    ids = [self.unk_token_id]
                    break
                ids.append(found)
                start = end
        if len(self._wp_cache) > 100_000:
            self._wp_cache.clear()
        self._wp_cache[word] = ids
        return ids

    def _token_ids(self, text: str) -> list[int]:
        """Ids of ``text`` without [CLS]/[SEP]."""
        ids: list[int] = []
        for piece, is_added in self._split(text, self._raw_tokens):
            if is_added:
                ids.append(self.encoder[piece])
                continue
            for npiece, n_added in self._split(self._normalize(piece), self._norm_token_list):
                if n_added:
                    ids.append(self.encoder[self._norm_tokens[npiece]])
                    continue
                for word in pre_tokenize(npiece):
                    ids.extend(self._wordpiece(word))
        return ids

    def tokenize(self, text: str) -> list[str]:
        """Token strings of ``text`` (no [CLS]/[SEP]), e.g. ``"Unaffable"`` -> ``['un', '##aff', '##able']``."""
        return [self.decoder[i] for i in self._token_ids(text)]

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int]:
        if isinstance(tokens, str):
            return self.encoder.get(tokens, self.unk_token_id)
        return [self.encoder.get(t, self.unk_token_id) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | Iterable[int]) -> str | list[str]:
        if isinstance(ids, (int, np.integer)):
            return self.decoder.get(int(ids))
        return [self.decoder.get(int(i)) for i in ids]

    def encode(self, text: str) -> list[int]:
        """``[CLS] + ids + [SEP]`` for one string; no padding, no truncation."""
        return [self.cls_token_id, *self._token_ids(text), self.sep_token_id]

    def __call__(
        self,
        texts: str | Sequence[str],
        max_length: int | None = None,
        padding: bool | str = "max_length",
        truncation: bool = True,
    ) -> dict[str, np.ndarray]:
        """Batch-encode like ``AlignProcessor(text=texts)`` / ``tokenizer(texts, padding=..., ...)``.

        Args:
            texts: a string or a sequence of N strings.
            max_length: sequence length; default :data:`ALIGN_MAX_LENGTH` (64), what
                ``AlignProcessor`` passes.
            padding: ``"max_length"``, ``"longest"`` / ``True``, or ``False`` / ``"do_not_pad"``
                (rows must then have equal lengths).
            truncation: keep ``[CLS]``, the first ``max_length - 2`` tokens, ``[SEP]``. Note that
                ``AlignProcessor`` itself does *not* truncate (its defaults set no truncation):
                ``truncation=False`` reproduces it: rows are kept whole and, for
                ``padding="max_length"``, every row is padded to ``max(max_length, longest row)``
                (transformers returns a longer single row identically; for a batch with rows of
                different lengths it cannot build an array and raises).

        Returns:
            ``{"input_ids", "attention_mask", "token_type_ids"}``, each np.int32 (N, L); padding
            (right side) uses ``pad_token_id`` with attention mask 0; token type ids are 0.
        """
        if max_length is None:
            max_length = ALIGN_MAX_LENGTH
        pad = self.pad_token_id if self.pad_token_id is not None else 0
        input_ids, attention_mask = batch_encode(
            texts, self._token_ids, first_id=self.cls_token_id, last_id=self.sep_token_id,
            pad_id=pad, max_length=max_length, padding=padding, truncation=truncation,
            overlong="extend")
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "token_type_ids": np.zeros_like(input_ids)}

    # ------------------------------------------------------------------ decoding

    def decode(self, ids: Iterable[int] | np.ndarray, skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool | None = None) -> str:
        """Text of a 1-D id sequence, like transformers' ``decode``.

        tokenizers' WordPiece decoder: tokens joined with spaces, ``##`` pieces glued to the
        previous token, and ``" ."``, ``" ?"``, ``" !"``, ``" ,"`` tightened per token; unknown ids
        are skipped. ``clean_up_tokenization_spaces`` (default: the config's) additionally applies
        transformers' ``clean_up_tokenization``.
        """
        special = set(self.all_special_ids) if skip_special_tokens else set()
        tokens = []
        for i in np.asarray(ids, dtype=np.int64).reshape(-1).tolist():
            if i in special:
                continue
            tok = self.decoder.get(i)
            if tok is not None:
                tokens.append(tok)
        parts = []
        for k, tok in enumerate(tokens):
            if k:
                tok = tok[len(CONTINUATION_PREFIX):] if tok.startswith(CONTINUATION_PREFIX) else " " + tok
            parts.append(_cleanup(tok))
        text = "".join(parts)
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        if clean_up_tokenization_spaces:
            text = (text.replace(" .", ".").replace(" ?", "?").replace(" !", "!").replace(" ,", ",")
                    .replace(" ' ", "'").replace(" n't", "n't").replace(" 'm", "'m").replace(" 's", "'s")
                    .replace(" 've", "'ve").replace(" 're", "'re"))
        return text

    def batch_decode(self, ids: Iterable[Iterable[int]] | np.ndarray, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(row, skip_special_tokens=skip_special_tokens) for row in ids]


def _cleanup(tok: str) -> str:
    """tokenizers' ``decoders::wordpiece::cleanup`` (applied to each token)."""
    return (tok.replace(" .", ".").replace(" ?", "?").replace(" !", "!").replace(" ,", ",")
            .replace(" ' ", "'").replace(" n't", "n't").replace(" 'm", "'m").replace(" do not", " don't")
            .replace(" 's", "'s").replace(" 've", "'ve").replace(" 're", "'re"))
