"""The smaller gaps of issue 23 (item 7): each one exit code and one line that match what happened.

* ``verify`` of a folder that does not exist is a missing input (exit 3), as the README says, not a
  failed verification (7);
* ``--device cuda`` where the round trip's torch sees no GPU is a usage error before any work (it was
  found by the child process, after the whole conversion);
* an uncached ``--base ORG/NAME`` is named as the user typed it (it printed ``PosixPath(...)``);
* a copied work_dir's ``last_checkpoint`` names the original run's file: the file beside it is
  converted, and the command says which one.
(The note on a dead run's partial folder is in ``test_names_and_leftovers.py`` and the kill -9 test.)
"""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
from _reliability import NO_VERIFY, Guard, assert_one_error_line, assert_refused

from sa2va_convert.testing.fixtures import write_training_checkpoint


def test_verify_of_a_missing_folder_is_exit_3(sa2va, tmp_path):
    r = sa2va("verify", tmp_path / "nope")
    assert_one_error_line(r, 3, tmp_path / "nope", "does not exist")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch that sees no GPU")
def test_device_cuda_without_a_gpu_is_refused_before_any_work(sa2va, tiny):
    guard = Guard((tiny.ckpt.path, tiny.base), tiny.out)
    r = sa2va(tiny.ckpt.path, tiny.out, "--base", tiny.base, "--device", "cuda")
    assert_refused(r, 2, guard, sys.executable, "--device cuda asked for the round trip", "sees no GPU", "--no-verify")
    assert "reading" not in r.stderr, "the checkpoint was read before the device was checked"
    v = sa2va("verify", tiny.base, "--device", "cuda:1")
    assert_one_error_line(v, 2, sys.executable, "--device cuda:1", "--no-roundtrip")
    assert "checking files" not in v.stderr


def test_an_uncached_hub_base_is_named_as_typed(sa2va, tiny, tmp_path):
    env = {"HF_HUB_CACHE": str(tmp_path / "empty-cache"), "HF_HUB_OFFLINE": "1"}
    guard = Guard((tiny.ckpt.path,), tiny.out)
    r = sa2va(tiny.ckpt.path, tiny.out, "--base", "acme/not-cached", env=env)
    line = assert_refused(r, 3, guard, "acme/not-cached", "'acme/not-cached' is not in the local Hugging Face cache",
                          "hf download acme/not-cached")
    assert "PosixPath" not in line


def test_a_copied_work_dir_converts_its_own_checkpoint_and_says_so(sa2va, tiny, tmp_path):
    original = tmp_path / "runs" / "exp"
    for it, seed in ((100, 1), (200, 2)):
        write_training_checkpoint(original / f"iter_{it}.pth", "sa2va-1b", base_dir=tiny.base, seed=seed,
                                  iteration=it)
    (original / "last_checkpoint").write_text(str(original / "iter_200.pth"))
    copy = tmp_path / "copied" / "exp"
    shutil.copytree(original, copy)  # last_checkpoint still names the original's iter_200.pth
    write_training_checkpoint(copy / "iter_200.pth", "sa2va-1b", base_dir=tiny.base, seed=7, iteration=200)
    r = sa2va(copy, tiny.out, "--base", tiny.base, "--json", *NO_VERIFY)
    assert r.returncode == 0, r
    used = json.loads(r.stdout)["plan"]["checkpoint"]
    assert used == str(copy / "iter_200.pth")
    assert f"names {original / 'iter_200.pth'}, outside this work_dir" in r.stderr, r
    assert f"using the file beside it, {copy / 'iter_200.pth'}" in r.stderr, r
    report = json.loads((tiny.out / "conversion_report.json").read_text())
    assert report["source"]["checkpoint"] == str(copy / "iter_200.pth")
