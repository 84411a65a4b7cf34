"""Write the tokenizer files of the output with the tokens the plan adds.

The plan decides which tokens are added and their ids (``plan.vocab.plan_additions``); this is
the edit of the files themselves: the added tokens appended to ``tokenizer.json``,
``tokenizer_config.json``, ``special_tokens_map.json`` and ``added_tokens.json``, the same bytes
for the same plan.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..plan.vocab import TokenAddition

__all__ = ["apply_additions"]


def apply_additions(src: Path, dst: Path, addition: TokenAddition) -> list[str]:
    """Write edited copies of the tokenizer files into ``dst``; returns the files written."""
    written: list[str] = []
    if not addition.tokens:
        return written
    entries = [
        {
            "id": i,
            "content": t,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for t, i in addition.tokens
    ]
    tj = src / "tokenizer.json"
    if tj.is_file():
        data = json.loads(tj.read_text(encoding="utf-8"))
        data.setdefault("added_tokens", []).extend(entries)
        _dump(dst / "tokenizer.json", data)
        written.append("tokenizer.json")
    cfg = src / "tokenizer_config.json"
    if cfg.is_file():
        data = json.loads(cfg.read_text(encoding="utf-8"))
        dec = data.setdefault("added_tokens_decoder", {})
        for e in entries:
            dec[str(e["id"])] = {k: v for k, v in e.items() if k != "id"}
        extra = data.setdefault("additional_special_tokens", []) or []
        data["additional_special_tokens"] = list(extra) + [t for t, _ in addition.tokens if t not in extra]
        _dump(dst / "tokenizer_config.json", data)
        written.append("tokenizer_config.json")
    stm = src / "special_tokens_map.json"
    if stm.is_file():
        data = json.loads(stm.read_text(encoding="utf-8"))
        extra = data.get("additional_special_tokens") or []
        present = {x if isinstance(x, str) else x.get("content") for x in extra}
        data["additional_special_tokens"] = list(extra) + [t for t, _ in addition.tokens if t not in present]
        _dump(dst / "special_tokens_map.json", data)
        written.append("special_tokens_map.json")
    at = src / "added_tokens.json"
    if at.is_file() or not tj.is_file():
        data = json.loads(at.read_text(encoding="utf-8")) if at.is_file() else {}
        data.update({t: i for t, i in addition.tokens})
        _dump(dst / "added_tokens.json", data)
        written.append("added_tokens.json")
    return written


def _dump(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
