#!/usr/bin/env python
"""Regenerate ``vocab.json`` and ``merges.txt`` of the CLIP BPE tokenizer.

The source is OpenAI CLIP's ``bpe_simple_vocab_16e6.txt.gz`` (MIT licence, copyright 2021 OpenAI),
which ships e.g. inside the ``open-clip-torch`` wheel (``open_clip/bpe_simple_vocab_16e6.txt.gz``)::

    pip download --no-deps open-clip-torch==3.3.0 -d /tmp/oc
    unzip -o /tmp/oc/open_clip_torch-3.3.0-py3-none-any.whl 'open_clip/*.gz' -d /tmp/oc
    python launch/make_clip_vocab.py /tmp/oc/open_clip/bpe_simple_vocab_16e6.txt.gz \
        rpo_jax/assets/clip_tokenizer

The output reproduces HuggingFace's ``openai/clip-vit-large-patch14`` tokenizer files (the ones
Stable Diffusion 1.x/2.x ship in their ``tokenizer/`` folder), following OpenAI's
``SimpleTokenizer`` construction:

* the .gz holds a header line and 262,144 merges; CLIP uses the first
  ``49152 - 256 - 2 = 48,894`` of them (lines 1..48894 after the header);
* ``vocab.json`` (49,408 entries, ids are positions): the 256 byte-level unicode characters in
  GPT-2's ``bytes_to_unicode`` order (``sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet())``:
  printable bytes map to themselves, the others to U+0100.. in byte order), the same 256 with ``</w>`` appended, each merge joined without the
  space, then ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407);
* ``merges.txt``: ``#version: 0.2`` followed by those 48,894 merge lines.

Only the standard library and ``tokenizers`` (for the byte-level alphabet) are used.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import sys

from tokenizers.pre_tokenizers import ByteLevel

NUM_MERGES = 49152 - 256 - 2  # 48,894
VOCAB_SIZE = 49408


def build(gz_path: str) -> tuple[dict[str, int], list[str]]:
    """Returns ``(vocab, merge_lines)`` built from the OpenAI .gz file."""
    with gzip.open(gz_path, "rb") as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = lines[1 : NUM_MERGES + 1]
    if len(merges) != NUM_MERGES:
        raise ValueError(f"{gz_path}: expected at least {NUM_MERGES} merge lines, found {len(merges)}")
    pairs = []
    for i, line in enumerate(merges, start=2):
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{gz_path}: line {i} is not a merge pair: {line!r}")
        pairs.append(parts)
    tokens = sorted(ByteLevel.alphabet())  # the 256 byte-level symbols; sorted = GPT-2's byte order
    tokens = tokens + [t + "</w>" for t in tokens]
    tokens += ["".join(p) for p in pairs]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"{gz_path}: built {len(vocab)} unique tokens, expected {VOCAB_SIZE}")
    return vocab, [" ".join(p) for p in pairs]


def write(vocab: dict[str, int], merge_lines: list[str], out_dir: str) -> tuple[str, str]:
    """Writes ``vocab.json`` (one line, id order, UTF-8) and ``merges.txt`` into ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    vocab_path = os.path.join(out_dir, "vocab.json")
    merges_path = os.path.join(out_dir, "merges.txt")
    with open(vocab_path, "w", encoding="utf-8", newline="\n") as f:
        f.write(json.dumps(vocab, ensure_ascii=False))
    with open(merges_path, "w", encoding="utf-8", newline="\n") as f:
        f.write("#version: 0.2\n")
        f.write("\n".join(merge_lines))
        f.write("\n")
    return vocab_path, merges_path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("gz", help="path to bpe_simple_vocab_16e6.txt.gz")
    p.add_argument("out_dir", nargs="?", default=os.path.join(os.path.dirname(__file__), "..", "rpo_jax", "assets", "clip_tokenizer"),
                   help="output folder (default: rpo_jax/assets/clip_tokenizer)")
    args = p.parse_args(argv)
    vocab, merge_lines = build(args.gz)
    for path in write(vocab, merge_lines, args.out_dir):
        print(f"wrote {os.path.normpath(path)} ({os.path.getsize(path):,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
