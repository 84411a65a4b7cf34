"""Conventions users bring from other tools: ``python -m``, fast ``--help``, ``-q/-v``, whole names in
piped output, ``schema_version``, exit codes, the Hub cache for ``--base org/name``, the model card's
front matter, and a Python API that accepts what the CLI accepts.

Everything runs the real CLI in a subprocess (``_cli.run_cli``) on real fixture files; the Hub cache is
a real on-disk cache layout resolved by huggingface_hub itself.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest

from sa2va_convert.errors import UsageError
import yaml

from _cli import run_cli
from sa2va_convert import cli as cli_module
from sa2va_convert.options import ConvertOptions
from sa2va_convert.plan.keymap import builtin_names

PY = sys.executable


def _py(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


# ---------------------------------------------------------------- start-up and entry points


def test_python_dash_m_runs_the_cli():
    p = subprocess.run([PY, "-m", "sa2va_convert", "--version"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("sa2va-convert, version ")
    h = subprocess.run([PY, "-m", "sa2va_convert", "--help"], capture_output=True, text=True, timeout=60)
    assert h.returncode == 0 and h.stdout.startswith("Usage: sa2va-convert ")


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["convert", "--help"], ["keymaps", "list", "--help"],
                                  ["verify", "--help"]])
def test_help_and_version_do_not_import_torch(argv):
    code = ("import sys\nfrom sa2va_convert.cli import main\n"
            f"try:\n    main({argv!r}, prog_name='sa2va-convert')\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'transformers', 'safetensors', 'numpy') if m in sys.modules]\n"
            "print('HEAVY=' + ','.join(heavy))")
    p = _py(code)
    assert p.returncode == 0, p.stderr
    assert "HEAVY=\n" in p.stdout or p.stdout.rstrip().endswith("HEAVY="), p.stdout[-300:]


def test_a_conversion_imports_no_transformers_unless_a_size_is_typed(make_family, tmp_path):
    """transformers costs ~1.5 s of start-up (issue 14); a conversion needs it only to parse a typed size."""
    fam = make_family("sa2va-1b")
    code = ("import sys\nfrom sa2va_convert.cli import main\n"
            "try:\n    main(sys.argv[1:], prog_name='sa2va-convert')\nexcept SystemExit as e:\n    rc = e.code\n"
            "print('RC=%s TRANSFORMERS=%s' % (rc, 'transformers' in sys.modules))")
    base = [PY, "-c", code, str(fam.ckpt.path), "--base", str(fam.base), "--no-verify", "-q"]
    p = subprocess.run([*base, str(tmp_path / "a")], capture_output=True, text=True, timeout=300)
    assert "RC=0 TRANSFORMERS=False" in p.stdout, p.stdout[-300:] + p.stderr[-1000:]
    typed = subprocess.run([*base, str(tmp_path / "b"), "--max-shard-size", "50KB"], capture_output=True, text=True,
                           timeout=300)
    assert "RC=0 TRANSFORMERS=True" in typed.stdout, typed.stdout[-300:] + typed.stderr[-1000:]
    assert len(list((tmp_path / "b").glob("model-*.safetensors"))) > len(list((tmp_path / "a").glob("model-*.safetensors")))


def test_shell_completion_completes_keymap_names_without_torch():
    code = ("import sys\nfrom sa2va_convert.cli import main\n"
            "try:\n    main(prog_name='sa2va-convert')\nexcept SystemExit:\n    pass\n"
            "print('TORCH=' + str('torch' in sys.modules))")
    env = {"_SA2VA_CONVERT_COMPLETE": "bash_complete", "COMP_WORDS": "sa2va-convert keymaps show sa2va-v2",
           "COMP_CWORD": "3"}
    p = _py(code, env)
    assert p.returncode == 0, p.stderr
    assert "TORCH=False" in p.stdout
    completed = [line.split(",", 1)[1] for line in p.stdout.splitlines() if line.startswith("plain,")]
    assert completed == [n for n in builtin_names() if n.startswith("sa2va-v2")] and completed
    env["COMP_WORDS"], env["COMP_CWORD"] = "sa2va-convert ck out --keymap sa2va-v1-internvl-q", "4"
    p = _py(code, env)
    assert [line for line in p.stdout.splitlines() if line.startswith("plain,")] == ["plain,sa2va-v1-internvl-qwen2"]


def test_help_marks_convert_as_the_default_command():
    r = run_cli("--help")
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    assert any(line.strip().startswith("convert*") for line in lines)
    assert "* default: `sa2va-convert CKPT OUT` runs `sa2va-convert convert CKPT OUT`." in " ".join(
        line.strip() for line in lines)


def _all_commands(group: click.Group, prefix: str = "") -> list[tuple[str, click.Command]]:
    out = []
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            out += _all_commands(cmd, prefix + name + " ")
        else:
            out.append((prefix + name, cmd))
    return out


def test_every_command_has_the_same_quiet_verbose_pair():
    commands = _all_commands(cli_module.main)
    assert {name for name, _ in commands} >= {"convert", "inspect", "verify", "predict", "keymaps list",
                                             "keymaps show", "keymaps lint"}
    for name, cmd in commands:
        opts = {p.name: set(p.opts) for p in cmd.params if isinstance(p, click.Option)}
        assert opts.get("quiet") == {"-q", "--quiet"}, name
        assert opts.get("verbose") == {"-v", "--verbose"}, name


# ---------------------------------------------------------------- output: whole names, units, JSON


def test_keymaps_list_piped_prints_whole_names_and_patterns():
    r = run_cli("keymaps", "list", env={"COLUMNS": "60"})
    assert r.returncode == 0, r.stderr
    assert "…" not in r.stdout
    for name in builtin_names():
        assert name in r.stdout
    # the evidence regexes are whole too (each is a single unbroken string in one row)
    assert r"^mllm\.model\.(base_model\.model\.)?model\.language_model\." in r.stdout


def test_tables_fold_rather_than_truncate_on_a_narrow_terminal():
    from rich.console import Console

    from sa2va_convert.cli_render import table

    name = "mllm.model.language_model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    console = Console(width=40, record=True, force_terminal=True, color_system=None)
    console.print(table("t", ["name", "x"], [[name, "[SEG]"]]))
    text = console.export_text()
    assert "…" not in text
    cells = "".join(line.split("│")[1].strip() for line in text.splitlines() if line.count("│") >= 3)
    assert name in cells
    assert "[SEG]" in text  # a cell is text, not rich markup


def test_progress_counts_binary_units():
    from rich.progress import DownloadColumn

    from sa2va_convert.cli_render import BinarySpeedColumn, RichProgress, human_bytes

    bar = RichProgress()
    bar.start(3 * 2**20, 2)
    try:
        columns = bar.bar.columns
        download = next(c for c in columns if isinstance(c, DownloadColumn))
        assert download.binary_units
        assert any(isinstance(c, BinarySpeedColumn) for c in columns)
        bar.advance("x", 2**20)
        task = bar.bar.tasks[0]
        assert "MiB" in str(download.render(task))
    finally:
        bar.finish()
    assert human_bytes(1536) == "1.5 KiB"


def _long_out(tmp_path: Path) -> Path:
    return tmp_path / ("a-deliberately-long-output-folder-name-" * 3) / "converted-model-output"


def test_converted_line_and_tensor_names_are_whole_when_piped(make_family, tmp_path):
    fam = make_family("sa2va-1b")
    out = _long_out(tmp_path)
    out.parent.mkdir()
    dry = run_cli(fam.ckpt.path, out, "--base", fam.base, "--dry-run", "--show-tensors")
    assert dry.returncode == 0, dry.stderr
    plan = json.loads(run_cli(fam.ckpt.path, out, "--base", fam.base, "--dry-run", "--show-tensors",
                              "--json").stdout)["plan"]
    longest = max((t["name"] for t in plan["tensors"]), key=len)
    assert longest in dry.stdout and "…" not in dry.stdout
    r = run_cli(fam.ckpt.path, out, "--base", fam.base)
    assert r.returncode == 0, r.stderr
    line = next(line for line in r.stdout.splitlines() if line.startswith("converted "))
    assert f"-> {out.absolute()} (" in line


def test_verbose_names_every_tensor_and_quiet_prints_nothing(make_family, tmp_path):
    fam = make_family("sa2va-1b")
    v = run_cli(fam.ckpt.path, tmp_path / "v", "--base", fam.base, "-v")
    assert v.returncode == 0, v.stderr
    wrote = [line for line in v.stderr.splitlines() if line.startswith("sa2va-convert: wrote ")]
    index = json.loads((tmp_path / "v" / "model.safetensors.index.json").read_text())
    assert len(wrote) == len(index["weight_map"])
    q = run_cli(fam.ckpt.path, tmp_path / "q", "--base", fam.base, "-q")
    assert q.returncode == 0 and q.stderr == ""


def test_every_json_document_carries_schema_version_and_ok(make_family, tmp_path):
    fam = make_family("sa2va-1b")
    work_dir = fam.ckpt.path.parent
    docs = {
        "inspect": run_cli("inspect", fam.ckpt.path, "--json"),
        "keymaps list": run_cli("keymaps", "list", "--json"),
        "dry-run": run_cli(fam.ckpt.path, tmp_path / "o", "--base", fam.base, "--dry-run", "--json"),
        "convert": run_cli(fam.ckpt.path, tmp_path / "o", "--base", fam.base, "--json"),
        "verify": run_cli("verify", tmp_path / "o", "--no-roundtrip", "--json"),
        "error": run_cli(fam.ckpt.path, tmp_path / "o", "--base", fam.base, "--json"),  # exists: exit 6
        "all": run_cli(work_dir, tmp_path / "batch", "--all", "--base", fam.base, "--json"),
    }
    for what, r in docs.items():
        doc = json.loads(r.stdout)
        assert doc["schema_version"] == cli_module.SCHEMA_VERSION, what
        assert doc["ok"] is (what != "error"), what
    assert docs["error"].returncode == 6
    assert {k["name"] for k in json.loads(docs["keymaps list"].stdout)["keymaps"]} == set(builtin_names())


# ---------------------------------------------------------------- exit codes and accepted inputs


def test_keymap_exit_codes(make_family, tmp_path):
    missing = run_cli("keymaps", "lint", tmp_path / "nope.yaml")
    assert missing.returncode == 3 and missing.error_lines and "does not exist" in missing.error_lines[0]
    fam = make_family("sa2va-1b")
    r = run_cli(fam.ckpt.path, tmp_path / "o", "--base", fam.base, "--keymap", tmp_path / "nope.yaml")
    assert r.returncode == 3, r.stderr
    unknown = run_cli(fam.ckpt.path, tmp_path / "o", "--base", fam.base, "--keymap", "no-such-keymap")
    assert unknown.returncode == 2 and "no built-in keymap named 'no-such-keymap'" in unknown.stderr
    assert run_cli("keymaps", "show", "no-such-keymap").returncode == 2


def test_inspect_accepts_a_work_dir_like_convert(make_family):
    fam = make_family("sa2va-1b")
    r = run_cli("inspect", fam.ckpt.path.parent, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["path"].endswith("iter_100.pth")


def test_api_accepts_a_work_dir_and_shares_the_cli_defaults(make_family, tmp_path):
    from sa2va_convert import ConvertOptions, convert, plan_conversion

    fam = make_family("sa2va-1b")
    plan = plan_conversion(fam.ckpt.path.parent, tmp_path / "o", ConvertOptions(base=fam.base))
    assert plan.checkpoint.endswith("iter_100.pth")
    res = convert(fam.ckpt.path.parent, tmp_path / "o", ConvertOptions(base=fam.base, roundtrip=False))
    assert res.plan.checkpoint.endswith("iter_100.pth") and (tmp_path / "o" / "config.json").is_file()
    # one default for the round trip: the CLI's --verify/--no-verify and the API agree
    cli_default = next(p.default for p in cli_module.convert.params if p.name == "roundtrip")
    assert ConvertOptions().roundtrip is cli_default is True


def _api_hint_for_a_foreign_out(fam, out: Path) -> str:
    """The hint the API gives when OUT is a folder this tool did not write."""
    from sa2va_convert import ConvertOptions, OutputError, convert

    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(OutputError) as e:
        convert(fam.ckpt.path, out, ConvertOptions(base=fam.base, roundtrip=False))
    return e.value.hint


def test_api_hints_name_python_options_not_cli_flags(make_family, tmp_path):
    from sa2va_convert import ConvertOptions, OutputError, convert

    fam = make_family("sa2va-1b")
    out = tmp_path / "o"
    hint = _api_hint_for_a_foreign_out(fam, out)
    # a folder this tool did not write: the hint names the explicit option, in Python terms
    assert "--" not in hint and "ConvertOptions.replace_foreign" in hint
    r = run_cli(fam.ckpt.path, out, "--base", fam.base)
    assert r.returncode == 6 and "--replace-foreign" in r.error_lines[0]
    ours = tmp_path / "ours"
    convert(fam.ckpt.path, ours, ConvertOptions(base=fam.base, roundtrip=False))
    with pytest.raises(OutputError) as e:
        convert(fam.ckpt.path, ours, ConvertOptions(base=fam.base, roundtrip=False))
    assert "--force" not in e.value.hint and "ConvertOptions.force" in e.value.hint


def test_api_hints_are_python_worded_again_after_a_cli_command_in_the_same_process(make_family, tmp_path):
    from click.testing import CliRunner

    # a CLI command run in this process (as a notebook or a wrapper script may) that ends in a usage error;
    # conftest's signal check also makes sure the command left this process's handlers as they were
    r = CliRunner().invoke(cli_module.main, ["keymaps", "show", "no-such-keymap"])
    assert r.exit_code == 2, r.output
    hint = _api_hint_for_a_foreign_out(make_family("sa2va-1b"), tmp_path / "o")
    assert "--" not in hint and "ConvertOptions.replace_foreign" in hint


def test_public_api_is_exported_and_typed():
    import sa2va_convert

    assert sa2va_convert.__all__ == ["__version__", *sa2va_convert._EXPORTS]
    for name in sa2va_convert.__all__:
        assert getattr(sa2va_convert, name) is not None, name
    assert {"convert", "convert_all", "dry_run", "plan_conversion", "verify_folder", "predict", "inspect_checkpoint",
            "ConvertOptions", "ConvertError"} <= set(sa2va_convert.__all__)
    assert (Path(sa2va_convert.__file__).parent / "py.typed").is_file()
    p = _py("import sys, sa2va_convert; print('torch' in sys.modules)")
    assert p.stdout.strip() == "False"


def test_size_parser_is_the_one_save_pretrained_uses():
    from transformers.utils.hub import convert_file_size_to_int

    from sa2va_convert.sizes import parse_size

    for text in ("5GB", "500MB", "2GiB", "10KiB"):
        assert parse_size(text) == convert_file_size_to_int(text)
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30
    # the default --help shows is the API's default (the CLI does not parse it, to skip importing transformers)
    shown = next(p.show_default for p in cli_module.convert.params if p.name == "max_shard_bytes")
    assert parse_size(shown) == ConvertOptions().max_shard_bytes
    assert parse_size("123456") == 123456
    with pytest.raises(UsageError) as e:  # a usage error, exit 2, found before any work
        ConvertOptions(max_shard_bytes="five gigs").validate()
    assert e.value.exit_code == 2 and "max shard size 'five gigs'" in str(e.value)


# ---------------------------------------------------------------- convert's options: declared once


FIELDS = [f.name for f in dataclasses.fields(ConvertOptions)]
# convert's parameters that are not ConvertOptions: what to run and how to show it
CONVERT_ONLY = {"checkpoint", "out", "show_tensors", "all_checkpoints", "quiet", "verbose", "debug", "json_out"}


def _convert_params() -> dict[str, click.Parameter]:
    return {p.name: p for p in cli_module.convert.params if p.name}


def _as_options(argv: list[str]) -> ConvertOptions:
    """What ``convert`` hands to ConvertOptions for ``argv`` (parsed by click, nothing run)."""
    ctx = cli_module.convert.make_context("convert", ["ckpt", "out", *argv])
    return ConvertOptions(**{name: ctx.params[name] for name in FIELDS})


def test_every_convert_option_is_one_convert_options_field_and_back():
    names = [p.name for p in cli_module.convert.params]
    assert len(names) == len(set(names))
    assert set(names) - CONVERT_ONLY == set(FIELDS) and not CONVERT_ONLY & set(FIELDS)
    assert [n for n in names if n in FIELDS] == FIELDS  # --help lists them in field order


def test_convert_defaults_are_the_api_defaults():
    assert _as_options([]) == ConvertOptions()


def _non_default(p: click.Option) -> list[str]:
    """One command-line value for ``p`` that differs from its default."""
    if p.is_flag:
        return [p.secondary_opts[0] if p.default is True and p.secondary_opts else p.opts[0]]
    if isinstance(p.type, click.Choice):
        return [p.opts[0], next(c for c in p.type.choices if c != p.default)]
    return [p.opts[0], "2.5" if p.type is click.FLOAT else "x"]


@pytest.mark.parametrize("name", FIELDS)
def test_each_convert_option_reaches_its_own_field(name):
    opts = _as_options(_non_default(_convert_params()[name]))
    changed = [f for f in FIELDS if getattr(opts, f) != getattr(ConvertOptions(), f)]
    assert changed == [name]


def test_api_hints_name_the_field_behind_every_convert_flag():
    """A CLI hint rewritten for Python callers names the field a flag sets, also where the two are spelled
    differently (``--verify`` is ``roundtrip``, ``--max-shard-size`` is ``max_shard_bytes``)."""
    from sa2va_convert.errors import api_wording

    params = _convert_params()
    for name in FIELDS:
        if name == "dry_run":  # the API's dry run is its own function, plan_conversion()
            continue
        for flag in [*params[name].opts, *params[name].secondary_opts]:
            assert name in api_wording(f"pass {flag}"), flag


# ---------------------------------------------------------------- the Hub cache and the model card


def _fake_hub_cache(root: Path, repo: str, good: Path, bad: Path) -> tuple[Path, Path]:
    """A real huggingface_hub cache layout: two snapshots, refs/main naming the OLDER one."""
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    old, new = "1" * 40, "2" * 40
    shutil.copytree(good, repo_dir / "snapshots" / old)
    shutil.copytree(bad, repo_dir / "snapshots" / new)
    later = time.time() + 60
    os.utime(repo_dir / "snapshots" / new, (later, later))  # the newest on disk is not what main names
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(old)
    return repo_dir / "snapshots" / old, repo_dir / "snapshots" / new


def test_base_as_hub_repo_id_resolves_through_refs_main(make_family, base_cache, tmp_path):
    fam = make_family("sa2va-1b")
    good = tmp_path / "good"
    shutil.copytree(fam.base, good)
    (good / "README.md").write_text("---\nlicense: apache-2.0\nbase_model: OpenGVLab/InternVL2_5-1B\n---\n# base\n")
    # where huggingface_hub keeps it by default (~/.cache/huggingface/hub): a base under a ".cache" folder once
    # lost every non-weight file (remote code, tokenizer) to a filter meant for a .cache folder inside it
    hub = tmp_path / ".cache" / "huggingface" / "hub"
    main_snap, newer = _fake_hub_cache(hub, "acme/Sa2VA-1B", good, base_cache("sa2va-qwen2_5-vl"))
    env = {"HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"}

    # what huggingface_hub itself says the repo resolves to, offline
    p = _py("from huggingface_hub import snapshot_download\n"
            "print(snapshot_download('acme/Sa2VA-1B', local_files_only=True))", env)
    assert p.returncode == 0, p.stderr
    assert Path(p.stdout.strip()) == main_snap

    out = tmp_path / "out"
    r = run_cli(fam.ckpt.path, out, "--base", "acme/Sa2VA-1B", "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert Path(json.loads(r.stdout)["plan"]["base"]) == main_snap  # refs/main, not the newest snapshot

    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["base_model"] == "acme/Sa2VA-1B" and front["base_model_relation"] == "finetune"
    assert front["license"] == "apache-2.0"
    assert front["pipeline_tag"] == "image-text-to-text" and "sa2va" in front["tags"]
    assert "dtype='auto'" in card and "torch_dtype" not in card and "pypi.org" not in card

    pinned = run_cli(fam.ckpt.path, tmp_path / "pinned", "--base", f"acme/Sa2VA-1B@{newer.name}", "--dry-run",
                     "--json", env=env)
    assert pinned.returncode == 5  # the newer snapshot is another family's base: refused, as it should be

    missing = run_cli(fam.ckpt.path, tmp_path / "x", "--base", "acme/not-cached", env=env)
    assert missing.returncode == 3
    assert "not in the local Hugging Face cache" in missing.error_lines[0]


def test_discovery_uses_the_snapshot_refs_main_names(tmp_path, base_cache):
    hub = tmp_path / "hub"
    main_snap, _ = _fake_hub_cache(hub, "acme/Sa2VA-4B", base_cache("sa2va-4b"), base_cache("sa2va-1b"))
    p = _py("from sa2va_convert.plan.base_discovery import candidates\n"
            "print(candidates('acme/Sa2VA-4B'))", {"HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr
    assert str(main_snap) in p.stdout and "2222" not in p.stdout


def test_model_card_provenance_paths_are_absolute(make_family, tmp_path):
    fam = make_family("sa2va-1b")
    rel_ckpt = os.path.relpath(fam.ckpt.path, tmp_path)
    rel_base = os.path.relpath(fam.base, tmp_path)
    p = subprocess.run([PY, "-m", "sa2va_convert", rel_ckpt, "out", "--base", rel_base, "--no-verify"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, "CI": "1"})
    assert p.returncode == 0, p.stderr
    report = json.loads((tmp_path / "out" / "conversion_report.json").read_text())
    assert report["source"]["checkpoint"] == str(fam.ckpt.path.absolute())
    assert report["source"]["base"] == str(fam.base.absolute())
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"`{fam.ckpt.path.absolute()}`" in card and f"`{fam.base.absolute()}`" in card
