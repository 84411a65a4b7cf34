"""A small byte-level BPE tokenizer for fixture folders, built offline and deterministically.

Real Sa2VA folders ship a Qwen2 (byte-level BPE) or InternLM2 tokenizer with
InternVL's and Sa2VA's special tokens appended; the converter only cares that
len(tokenizer) matches the embedding rows and that the added tokens keep their
ids. So the fixture tokenizer is byte-level BPE too (every string round-trips
exactly), with merges learnt by a tiny pure-Python trainer on a fixed built-in
corpus: no download, and no dependence on the ``tokenizers`` trainer's
tie-breaking, so the same vocab size always gives the same ``tokenizer.json``.

Ids: 256 byte symbols, then the learnt merges, then inert ``<|unused_i|>``
fillers up to the requested size, then the added special tokens of DESIGN.md
in order (InternVL's, then Sa2VA's unless ``with_sa2va_tokens=False``). A raw
InternVL tokenizer is therefore a prefix of the Sa2VA one, as in reality.
"""

from __future__ import annotations

import json
from collections import Counter
from functools import lru_cache
from itertools import pairwise
from pathlib import Path

from .layouts import INTERNVL_TOKENS, SA2VA_TOKENS

#: Fixed training text: segmentation prompts, answers and chat-template words.
CORPUS = """\
<|im_start|>system
You are a helpful assistant.<|im_end|>
<|im_start|>user
<image>Please segment the blood vessel.<|im_end|>
<|im_start|>assistant
Sure, [SEG].<|im_end|>
Please segment the person in this image.
Please segment the car on the left.
Can you segment the dog in this image? Sure, it is [SEG].
Could you please segment the red apple on the table? Sure, [SEG].
What is the object in the middle of the picture? It is a cat.
Please describe the video in detail. A man is riding a bicycle along the road.
Please segment the tumor in the scan. Sure, the tumor is [SEG].
Please segment the left lung and the right lung. Sure, [SEG] and [SEG].
There is a small boat on the river, and two people are standing near the water.
The image shows a kitchen with a white table, three chairs and a window.
Please give a short answer. Yes. No. The answer is two.
Segment every tree in the picture. Sure, the trees are [SEG].
Where is the ball? The ball is under the chair, next to the green box.
This is a photo of a street at night with many cars and bright lights.
Please segment the cell nucleus in the microscopy image.
Please segment the building behind the people.
Which animal is running? The horse is running across the field.
Please segment the object that the woman is holding. Sure, it is the umbrella [SEG].
The quick brown fox jumps over the lazy dog.
"""

FILLER = "<|unused_{}|>"
MAX_MERGES = 1000  # what the corpus can support; bigger vocabularies are filled with fillers


def special_tokens(with_sa2va_tokens: bool = True) -> tuple[str, ...]:
    """The added special tokens in id order (DESIGN.md, "Tokenizer")."""
    return INTERNVL_TOKENS + (SA2VA_TOKENS if with_sa2va_tokens else ())


def special_token_id(vocab_size: int, token: str) -> int:
    """Id of an added token in a tokenizer built for ``vocab_size`` (same with or without Sa2VA's)."""
    specials = special_tokens(True)
    return vocab_size - len(specials) + specials.index(token)


def _byte_alphabet() -> list[str]:
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet())


def _pretokenize(text: str) -> list[str]:
    from tokenizers import pre_tokenizers

    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return [w for w, _ in pre.pre_tokenize_str(text)]


@lru_cache(maxsize=4)
def learn_merges(max_merges: int) -> tuple[tuple[str, str], ...]:
    """Greedy BPE on CORPUS: most frequent pair first, ties broken by the pair's text.

    Special tokens are cut out of the corpus first, as the real tokenizer
    never sees them as text.
    """
    text = CORPUS
    for tok in special_tokens(True) + ("<image>",):
        text = text.replace(tok, " ")
    words = Counter(tuple(w) for w in _pretokenize(text))
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, n in words.items():
            for a, b in pairwise(word):
                pairs[(a, b)] += n
        if not pairs:
            break
        best = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        if best[1] < 2:
            break
        a, b = best[0]
        merges.append((a, b))
        merged: Counter[tuple[str, ...]] = Counter()
        for word, n in words.items():
            out: list[str] = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += n
        words = merged
    return tuple(merges)


def build_tokenizer(vocab_size: int, *, with_sa2va_tokens: bool = True):
    """A ``tokenizers.Tokenizer`` whose length is ``vocab_size`` (with Sa2VA tokens) or
    ``vocab_size - 5`` (without them, i.e. a raw InternVL tokenizer of the same base).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers

    n_special = len(special_tokens(True))
    n_bpe = vocab_size - n_special
    alphabet = _byte_alphabet()
    if n_bpe < len(alphabet):
        raise ValueError(f"vocab_size {vocab_size} too small: need at least {len(alphabet) + n_special}")
    merges = learn_merges(min(MAX_MERGES, n_bpe - len(alphabet)))
    vocab: dict[str, int] = {ch: i for i, ch in enumerate(alphabet)}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    # fillers: unreachable entries (no merge produces them), as in padded real vocabularies
    i = 0
    while len(vocab) < n_bpe:
        vocab[FILLER.format(i)] = len(vocab)
        i += 1
    tok = Tokenizer(models.BPE(vocab=vocab, merges=list(merges), fuse_unk=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens(with_sa2va_tokens)])
    expected = vocab_size if with_sa2va_tokens else vocab_size - len(SA2VA_TOKENS)
    assert tok.get_vocab_size(with_added_tokens=True) == expected, "tokenizer size bug"
    return tok


def write_tokenizer(
    out_dir: str | Path,
    vocab_size: int,
    *,
    with_sa2va_tokens: bool = True,
    model_max_length: int = 32768,
) -> list[str]:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json; return the file names.

    The files load with ``transformers.AutoTokenizer.from_pretrained(out_dir)``
    as a ``PreTrainedTokenizerFast``; len(tokenizer) is the embedding rows.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(vocab_size, with_sa2va_tokens=with_sa2va_tokens)
    tok.save(str(out / "tokenizer.json"))
    specials = special_tokens(with_sa2va_tokens)
    extra = [t for t in specials if t not in ("<|endoftext|>", "<|im_end|>")]
    added = {
        str(tok.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in specials
    }
    config = {
        "added_tokens_decoder": added,
        "additional_special_tokens": extra,
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "model_max_length": model_max_length,
        "pad_token": "<|endoftext|>",
        "padding_side": "right",
        "split_special_tokens": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    }
    special_map = {
        "additional_special_tokens": extra,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
    }
    _write_json(out / "tokenizer_config.json", config)
    _write_json(out / "special_tokens_map.json", special_map)
    return ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


def _write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
