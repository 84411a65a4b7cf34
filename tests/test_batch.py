"""work_dir input and --all: newest checkpoint, every checkpoint, skip-if-same-bytes, failures reported."""

from __future__ import annotations

import json
import shutil

from sa2va_convert.testing.fixtures import write_training_checkpoint


def _work_dir(tmp_path, base, iters=(100, 200, 300)):
    work = tmp_path / "work_dirs" / "exp"
    for i, it in enumerate(iters):
        write_training_checkpoint(work / f"iter_{it}.pth", "sa2va-1b", base_dir=base, seed=10 + i, iteration=it)
    return work


def test_all_converts_each_checkpoint_reports_the_corrupt_one_and_rerun_skips(base_cache, tmp_path, cli):
    base = base_cache("sa2va-1b")
    work = _work_dir(tmp_path, base)
    corrupt = work / "iter_200.pth"
    corrupt.write_bytes(corrupt.read_bytes()[: corrupt.stat().st_size // 2])
    out = tmp_path / "out"
    r = cli(work, out, "--base", base, "--all", "--json")
    assert r.returncode == 8, r.stderr
    summary = json.loads(r.stdout)
    status = {i["checkpoint"].rsplit("/", 1)[1]: i["status"] for i in summary["items"]}
    assert status == {"iter_100.pth": "converted", "iter_200.pth": "failed", "iter_300.pth": "converted"}
    failed = next(i for i in summary["items"] if i["status"] == "failed")
    assert failed["error"]["exit_code"] == 3 and "iter_200.pth" in failed["error"]["path"]
    assert len(r.error_lines) == 1 and "1 of 3 checkpoint(s) failed" in r.error_lines[0]
    assert (out / "iter_100" / "config.json").exists() and not (out / "iter_200").exists()
    assert json.loads((out / "iter_300" / "conversion_report.json").read_text())["source"]["iteration"] == 300

    r2 = cli(work, out, "--base", base, "--all", "--json")
    status2 = {i["checkpoint"].rsplit("/", 1)[1]: i["status"] for i in json.loads(r2.stdout)["items"]}
    assert status2 == {"iter_100.pth": "skipped", "iter_200.pth": "failed", "iter_300.pth": "skipped"}

    # fixed: the rerun converts only what is new
    write_training_checkpoint(corrupt, "sa2va-1b", base_dir=base, seed=11, iteration=200)
    r3 = cli(work, out, "--base", base, "--all")
    assert r3.returncode == 0, r3.stderr
    assert "skipped" in r3.stdout and (out / "iter_200" / "config.json").exists()


def test_changed_checkpoint_bytes_are_not_skipped_but_need_force(base_cache, tmp_path, cli):
    base = base_cache("sa2va-1b")
    work = _work_dir(tmp_path, base, iters=(100,))
    out = tmp_path / "out"
    assert cli(work, out, "--base", base, "--all").returncode == 0
    write_training_checkpoint(work / "iter_100.pth", "sa2va-1b", base_dir=base, seed=99)
    r = cli(work, out, "--base", base, "--all", "--json")
    assert r.returncode == 8
    item = json.loads(r.stdout)["items"][0]
    assert item["status"] == "failed" and item["error"]["exit_code"] == 6
    assert cli(work, out, "--base", base, "--all", "--force").returncode == 0


def test_work_dir_without_last_checkpoint_takes_the_highest_iter(base_cache, tmp_path, cli):
    base = base_cache("sa2va-1b")
    work = _work_dir(tmp_path, base, iters=(5, 40, 300))
    r = cli(work, tmp_path / "out", "--base", base, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["plan"]["checkpoint"].endswith("iter_300.pth")


def test_empty_work_dir_is_an_input_error(tmp_path, cli):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("x")
    r = cli(work, tmp_path / "out", "--all")
    assert r.returncode == 3 and "no iter_N.pth" in r.error_lines[0]


def test_batch_reads_the_base_once(base_cache, tmp_path):
    """The base folder is opened once for the whole batch (its headers are not re-parsed per checkpoint)."""
    from sa2va_convert import batch
    from sa2va_convert.api import ConvertOptions
    from sa2va_convert.read import hf_folder

    base = tmp_path / "base"
    shutil.copytree(base_cache("sa2va-1b"), base)
    work = _work_dir(tmp_path, base, iters=(1, 2))
    calls = []
    real = hf_folder.open_hf_folder

    def counting(path, **kw):
        calls.append(str(path))
        return real(path, **kw)

    hf_folder.open_hf_folder = counting
    try:
        res = batch.convert_all(work, tmp_path / "out", ConvertOptions(roundtrip=False, base=base))
    finally:
        hf_folder.open_hf_folder = real
    assert [i.status for i in res.items] == ["converted", "converted"]
    assert calls == [str(base)]
