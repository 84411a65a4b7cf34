"""Tokenizer length and special-token growth, decided from the tokenizer FILES.

The converter must know ``len(tokenizer)`` to check it against the embedding
rows, but loading the tokenizer through transformers would run the base's
remote code (InternLM2 ships its tokenizer as Python). So the length is read
from the files themselves: ``tokenizer.json`` through the ``tokenizers``
library (pure data), or a SentencePiece ``tokenizer.model`` by counting its
pieces, plus the added tokens listed in ``tokenizer_config.json`` /
``added_tokens.json``. Adding tokens is planned here (``plan_additions``) and written, as a
deterministic edit of those files, by the write stage (``write/tokenizer.py``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)
# The files write.tokenizer.apply_additions() rewrites when tokens are added (the rest are copied as they are).
EDITED_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


@dataclass(frozen=True)
class TokenizerState:
    length: int  # len(tokenizer) as transformers would report it
    tokens: dict[str, int]  # added/special tokens we can see, content -> id
    files: tuple[str, ...]
    source: str  # what the length was computed from

    def has(self, token: str) -> bool:
        return token in self.tokens


@dataclass(frozen=True)
class TokenAddition:
    """Tokens appended to the vocabulary, with the ids training gave them."""

    tokens: tuple[tuple[str, int], ...] = field(default=())

    def to_dict(self) -> list[dict]:
        return [{"token": t, "id": i} for t, i in self.tokens]


def _read_json(path: Path, raw: bytes) -> dict:
    """``raw``, the bytes read from ``path``, as a JSON object (``path`` names the file in errors)."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(
            f"cannot read tokenizer file ({e})", path=path, hint="restore the tokenizer files from the original model"
        ) from None
    if not isinstance(data, dict):
        raise InputError(
            "tokenizer file is not a JSON object", path=path, hint="restore the tokenizer files from the original model"
        )
    return data


def _sentencepiece_piece_count(path: Path, data: bytes) -> int:
    """Count ``pieces`` (field 1) of a SentencePiece ModelProto (``data``, read from ``path``) without the
    sentencepiece package."""
    pos, count = 0, 0

    def varint() -> int:
        nonlocal pos
        shift = result = 0
        while True:
            if pos >= len(data):
                raise InputError(
                    "tokenizer.model is truncated",
                    path=path,
                    hint="restore the tokenizer files from the original model",
                )
            b = data[pos]
            pos += 1
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result
            shift += 7

    while pos < len(data):
        tag = varint()
        fieldno, wire = tag >> 3, tag & 7
        if wire == 0:
            varint()
        elif wire == 1:
            pos += 8
        elif wire == 2:
            pos += varint()
        elif wire == 5:
            pos += 4
        else:
            raise InputError(
                "tokenizer.model is not a SentencePiece model",
                path=path,
                hint="restore the tokenizer files from the original model",
            )
        if fieldno == 1 and wire == 2:
            count += 1
    return count


_PARSED: dict[bytes, TokenizerState] = {}  # content digest -> state (a few entries: the base's, the output's)
_PARSED_LOCK = threading.Lock()
_PARSED_MAX = 8


def _read_files(folder: Path, files: tuple[str, ...]) -> dict[str, bytes]:
    """The bytes of the tokenizer files present, each read once: the digest and the parse both use them."""
    contents = {}
    for name in files:
        try:
            contents[name] = (folder / name).read_bytes()
        except OSError as e:
            raise InputError(
                f"cannot read tokenizer file ({e.strerror or e})",
                path=folder / name,
                hint="restore the tokenizer files from the original model",
            ) from None
    return contents


def _content_digest(contents: dict[str, bytes]) -> bytes:
    """sha256 over the names and bytes of the tokenizer files."""
    h = hashlib.sha256()
    for name, data in contents.items():
        h.update(f"{name}\0{len(data)}\0".encode())
        h.update(data)
    return h.digest()


def read_tokenizer_state(folder: Path) -> TokenizerState:
    """The tokenizer's length and visible added tokens, from the files in ``folder``.

    Parsed once per content: a conversion reads the base's tokenizer to plan and the written one to
    check it, and where the write copied the files unchanged those are the same bytes (parsing an
    InternVL/Qwen ``tokenizer.json`` costs ~0.2 s on the VM). Files with other bytes are parsed anew,
    so the check still reads what was written.
    """
    folder = Path(folder)
    files = tuple(f for f in TOKENIZER_FILES if (folder / f).is_file())
    contents = _read_files(folder, files)
    digest = _content_digest(contents)
    with _PARSED_LOCK:
        known = _PARSED.get(digest)
    if known is None:
        known = _parse_tokenizer_state(folder, contents)
        with _PARSED_LOCK:
            if len(_PARSED) >= _PARSED_MAX:
                _PARSED.pop(next(iter(_PARSED)))
            _PARSED[digest] = known
    return dataclasses.replace(known, tokens=dict(known.tokens))  # the caller's own dict


def _parse_tokenizer_state(folder: Path, contents: dict[str, bytes]) -> TokenizerState:
    """The state of the tokenizer files ``contents`` ({name: bytes}, read from ``folder``), so that what is
    parsed is exactly what the digest covers."""
    files = tuple(contents)
    tokens: dict[str, int] = {}
    cfg_path = folder / "tokenizer_config.json"
    if "tokenizer_config.json" in contents:
        decoder = _read_json(cfg_path, contents["tokenizer_config.json"]).get("added_tokens_decoder") or {}
        for tid, entry in decoder.items():
            if isinstance(entry, dict) and "content" in entry:
                tokens[entry["content"]] = int(tid)
    added_path = folder / "added_tokens.json"
    if "added_tokens.json" in contents:
        tokens.update({k: int(v) for k, v in _read_json(added_path, contents["added_tokens.json"]).items()})

    tj = folder / "tokenizer.json"
    if "tokenizer.json" in contents:
        from tokenizers import Tokenizer  # pure data, no code from the folder

        try:
            text = contents["tokenizer.json"].decode("utf-8")
            tok = Tokenizer.from_str(text)
        except Exception as e:  # tokenizers raises its own exception type
            raise InputError(
                f"cannot parse tokenizer.json ({e})",
                path=tj,
                hint="restore the tokenizer files from the original model",
            ) from None
        vocab = tok.get_vocab(with_added_tokens=True)
        for content in list(tokens):
            if content not in vocab:
                tokens.pop(content)
        for entry in json.loads(text).get("added_tokens", []):
            tokens[entry["content"]] = int(entry["id"])
        length = max(len(vocab), max(vocab.values(), default=-1) + 1)
        return TokenizerState(length, tokens, files, "tokenizer.json")
    sp = folder / "tokenizer.model"
    if "tokenizer.model" in contents:
        base = _sentencepiece_piece_count(sp, contents["tokenizer.model"])
        extra = sum(1 for tid in tokens.values() if tid >= base)
        length = max(base + extra, max(tokens.values(), default=-1) + 1)
        return TokenizerState(length, tokens, files, "tokenizer.model + added tokens")
    vj = folder / "vocab.json"
    if "vocab.json" in contents:
        vocab = _read_json(vj, contents["vocab.json"])
        ids = set(vocab.values()) | set(tokens.values())
        return TokenizerState(max(ids, default=-1) + 1, tokens, files, "vocab.json + added tokens")
    raise InputError(
        "no tokenizer found (tokenizer.json, tokenizer.model or vocab.json)",
        path=folder,
        hint="the base folder must include the tokenizer files of the model",
    )


def plan_additions(state: TokenizerState, rows: int, special_tokens: list[str] | None, *, where: str) -> TokenAddition:
    """Decide which tokens make the tokenizer exactly ``rows`` long, or explain why none can."""
    if rows == state.length:
        return TokenAddition()
    if rows < state.length:
        raise _mismatch(
            f"the checkpoint's embedding has {rows} rows but the base tokenizer has {state.length} tokens", where
        )
    missing = [t for t in (special_tokens or []) if not state.has(t)]
    need = rows - state.length
    if len(missing) != need:
        listed = ", ".join(missing) if missing else "none"
        raise _mismatch(
            f"the checkpoint's embedding has {rows} rows, {need} more than the base tokenizer's {state.length}, "
            f"but the training config's special_tokens missing from the base are {len(missing)} ({listed})",
            where,
        )
    return TokenAddition(tuple((t, state.length + i) for i, t in enumerate(missing)))


def _mismatch(message: str, where: str):
    from ..errors import PlanError

    return PlanError(
        message, path=where, hint="pass --base with the folder whose tokenizer the fine-tune was trained with"
    )
