"""The tokenizer's length is parsed once per content (issue 26, sixth session): a conversion reads the
base's tokenizer to plan and the written one to check it, which were the same bytes parsed twice."""

from __future__ import annotations

import json
import shutil

import pytest

from sa2va_convert.errors import InputError
from sa2va_convert.plan import vocab
from sa2va_convert.testing.tokenizer import write_tokenizer


@pytest.fixture
def parses(monkeypatch):
    seen: list[str] = []
    real = vocab._parse_tokenizer_state

    def counting(folder, contents):
        seen.append(str(folder))
        return real(folder, contents)

    monkeypatch.setattr(vocab, "_parse_tokenizer_state", counting)
    monkeypatch.setattr(vocab, "_PARSED", {})
    return seen


def test_the_same_files_are_parsed_once_and_other_bytes_again(tmp_path, parses):
    write_tokenizer(tmp_path / "base", 300)
    shutil.copytree(tmp_path / "base", tmp_path / "copy")
    first = vocab.read_tokenizer_state(tmp_path / "base")
    again = vocab.read_tokenizer_state(tmp_path / "copy")  # the same bytes elsewhere: the write's copy
    assert parses == [str(tmp_path / "base")]
    assert again == first and first.length == 300 and first.has("[SEG]")

    again.tokens["<mine>"] = 1  # each caller has its own dict
    assert not vocab.read_tokenizer_state(tmp_path / "base").has("<mine>")

    cfg = tmp_path / "copy" / "tokenizer.json"  # one more added token: other bytes, parsed anew
    doc = json.loads(cfg.read_text())
    doc["added_tokens"].append({**doc["added_tokens"][-1], "id": 300, "content": "<extra>"})
    cfg.write_text(json.dumps(doc))
    grown = vocab.read_tokenizer_state(tmp_path / "copy")
    assert parses == [str(tmp_path / "base"), str(tmp_path / "copy")]
    assert grown.length == 301 and grown.has("<extra>")


def test_a_broken_tokenizer_is_still_refused_and_never_remembered(tmp_path, parses):
    write_tokenizer(tmp_path / "t", 300)
    (tmp_path / "t" / "tokenizer.json").write_bytes(b"\xff\xfe not json")
    for _ in range(2):
        with pytest.raises(InputError, match="cannot parse tokenizer.json"):
            vocab.read_tokenizer_state(tmp_path / "t")
    assert len(parses) == 2 and vocab._PARSED == {}
