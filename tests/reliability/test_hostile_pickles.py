"""Hostile checkpoints: pickles that would run code under ``torch.load(weights_only=False)``.

Each case plants a payload that creates a marker file (or deletes a victim
folder) in a real Sa2VA fixture checkpoint, runs the real CLI on it, and
requires: exit 4 (refused as unsafe), one error line naming the checkpoint and
the refused ``module.name`` with the ``--allow-global`` fix, no marker, inputs
untouched, no OUT. ``test_every_payload_is_live_under_plain_torch_load``
proves the payloads are real: loaded the usual unsafe way, each one fires.

Unit-level refusals of the unpickler (BUILD on allowed functions, getattr,
copyreg, codecs, ...) live in ``tests/test_safe_pickle.py``; this file is the
end-to-end catalogue through the command line.
"""

from __future__ import annotations

import builtins
import dataclasses
import importlib
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from _reliability import (
    Guard,
    RawOps,
    Reduce,
    assert_refused,
    binunicode,
    load_fixture_checkpoint,
    run_fresh,
    save_with_raw_ops,
    short_unicode,
)


@dataclass
class Hostile:
    """One planted payload: the file to convert and what firing would look like."""

    ckpt: Path  # the path given to the CLI
    refused: str  # the module.name the error must name
    fired: Callable[[], bool]  # True if the payload ran
    inputs: tuple[Path, ...]  # everything the run must leave untouched
    env: dict | None = None  # extra environment for the child (PYTHONPATH of a planted module)
    control_setup: str = ""  # Python run before the unsafe control load


def _marker_fired(marker: Path) -> Callable[[], bool]:
    def fired() -> bool:
        time.sleep(0.05) if not marker.exists() else None  # a spawned `touch` may lag a moment
        return marker.exists()

    return fired


def _plant(fam, where: str, payload, *, protocol: int = 2) -> Path:
    """Put ``payload`` into the fixture checkpoint at ``where`` and re-save it (raw opcodes allowed)."""
    path = fam.ckpt.path
    obj = load_fixture_checkpoint(path)
    if where == "meta":
        obj["meta"]["dataset_meta"] = {"classes": ["vessel"], "extra": [payload]}
    elif where == "meta-deep":
        obj["meta"]["dataset_meta"] = {"a": [{"b": ({"c": [[payload]]},)}]}
    elif where == "message_hub":
        obj["message_hub"]["runtime_info"]["evil"] = {"nested": payload}
    elif where == "param_schedulers":
        obj["param_schedulers"].append({"last_step": payload})
    elif where == "state_dict":
        sd = obj["state_dict"]
        sd[next(iter(sd))] = payload
    elif where == "top":
        obj["zzz_after_everything"] = payload
    else:
        raise ValueError(where)
    save_with_raw_ops(obj, path, protocol=protocol)
    return path


def _check(sa2va, fam, h: Hostile) -> None:
    out = fam.out
    guard = Guard((*h.inputs, fam.base), out)
    r = sa2va(h.ckpt, out, "--base", fam.base, env=h.env)
    assert not h.fired(), "THE PAYLOAD RAN"
    assert_refused(r, 4, guard, h.ckpt, h.refused, f"--allow-global {h.refused}", "never runs code")


# ------------------------------------------------------------------ the cases
# Each builder returns a Hostile for the fixture family ``fam`` in folder ``tmp``.


def os_system_global_opcode_in_meta(fam, tmp: Path) -> Hostile:
    marker = tmp / "PWNED-os-system"
    ops = b"cos\nsystem\n(" + binunicode(f"touch '{marker}'") + b"tR"  # GLOBAL 'os system', protocol 0-2
    path = _plant(fam, "meta", RawOps(ops))
    return Hostile(path, "os.system", _marker_fired(marker), (path,))


def posix_system_reduce_in_state_dict(fam, tmp: Path) -> Hostile:
    marker = tmp / "PWNED-posix-system"
    assert os.system.__module__ == "posix"  # pickles as GLOBAL 'posix system'
    path = _plant(fam, "state_dict", Reduce(os.system, f"touch '{marker}'"))
    return Hostile(path, "posix.system", _marker_fired(marker), (path,))


def subprocess_popen_in_message_hub(fam, tmp: Path) -> Hostile:
    marker = tmp / "PWNED-popen"
    path = _plant(fam, "message_hub", Reduce(subprocess.Popen, ["touch", str(marker)]))
    return Hostile(path, "subprocess.Popen", _marker_fired(marker), (path,))


def eval_nested_deep_in_meta(fam, tmp: Path) -> Hostile:
    marker = tmp / "PWNED-eval"
    path = _plant(fam, "meta-deep", Reduce(builtins.eval, f"open({str(marker)!r}, 'w').close()"))
    return Hostile(path, "builtins.eval", _marker_fired(marker), (path,))


def builtins_exec_in_param_schedulers(fam, tmp: Path) -> Hostile:
    marker = tmp / "PWNED-exec"
    path = _plant(fam, "param_schedulers", Reduce(builtins.exec, f"open({str(marker)!r}, 'w').close()"))
    return Hostile(path, "builtins.exec", _marker_fired(marker), (path,))


def payload_in_deepspeed_model_states_module(fam, tmp: Path) -> Hostile:
    from sa2va_convert.testing import write_training_checkpoint

    marker = tmp / "PWNED-deepspeed"
    path = tmp / "work_dirs" / "exp" / "iter_200.pth" / "mp_rank_00_model_states.pt"
    write_training_checkpoint(path, "sa2va-1b", fmt="deepspeed-module", base_dir=fam.base)
    obj = load_fixture_checkpoint(path)
    assert "module" in obj and "ds_version" in obj
    obj["module"]["text_hidden_fcs.0.weight"] = Reduce(os.system, f"touch '{marker}'")
    torch.save(obj, path)
    return Hostile(path, "posix.system", _marker_fired(marker), (path.parent,))


def stack_global_protocol_4(fam, tmp: Path) -> Hostile:
    marker = tmp / "PWNED-stack-global"
    ops = short_unicode("os") + short_unicode("system") + b"\x93" + short_unicode(f"touch '{marker}'") + b"\x85R"
    path = _plant(fam, "top", RawOps(ops), protocol=4)
    return Hostile(path, "os.system", _marker_fired(marker), (path,))


def global_of_unexpected_module_shutil_rmtree(fam, tmp: Path) -> Hostile:
    victim = tmp / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    ops = b"cshutil\nrmtree\n(" + binunicode(str(victim)) + b"tR"
    path = _plant(fam, "meta", RawOps(ops))
    return Hostile(path, "shutil.rmtree", lambda: not (victim / "precious.txt").exists(), (path, victim))


def inst_opcode_protocol_0(fam, tmp: Path) -> Hostile:
    marker = tmp / "PWNED-inst"
    ops = b"(V" + f"touch '{marker}'".encode() + b"\nios\nsystem\n"  # INST: find_class + call with the marked args
    path = _plant(fam, "meta", RawOps(ops))
    return Hostile(path, "os.system", _marker_fired(marker), (path,))


_EVIL_MODULE = "sa2va_reliability_evil"


def reduce_ex_to_importlib_import_module(fam, tmp: Path) -> Hostile:
    marker = tmp / "PWNED-import"
    evil_dir = tmp / "evil_site"
    evil_dir.mkdir()
    (evil_dir / f"{_EVIL_MODULE}.py").write_text(f"open({str(marker)!r}, 'w').close()\n")

    class ImportOnLoad:
        def __reduce_ex__(self, protocol):
            return importlib.import_module, (_EVIL_MODULE,)

    path = _plant(fam, "message_hub", ImportOnLoad())
    return Hostile(path, "importlib.import_module", _marker_fired(marker), (path, evil_dir),
                   env={"PYTHONPATH": str(evil_dir)}, control_setup=f"sys.path.insert(0, {str(evil_dir)!r})")


def _stage2(tmp: Path, marker: Path) -> Path:
    """A second hostile file, reached only if the first one could call a loader."""
    stage2 = tmp / "stage2.pth"
    torch.save({"x": Reduce(os.system, f"touch '{marker}'")}, stage2)
    return stage2


def reduce_ex_to_torch_load_itself(fam, tmp: Path) -> Hostile:
    marker = tmp / "PWNED-torch-load"
    stage2 = _stage2(tmp, marker)
    # torch.load(stage2, None, <the pickle module>): an explicit pickle_module turns weights_only off
    ops = (b"ctorch.serialization\nload\n(" + binunicode(str(stage2)) + b"N"
           + b"ctorch.serialization\npickle\n" + b"tR")
    path = _plant(fam, "meta", RawOps(ops))
    return Hostile(path, "torch.serialization.load", _marker_fired(marker), (path, stage2))


def torch_storage_load_from_bytes(fam, tmp: Path) -> Hostile:
    """torch.storage._load_from_bytes(b) is torch.load(BytesIO(b), weights_only=False): a nested unsafe load."""
    import io

    marker = tmp / "PWNED-storage"
    buf = io.BytesIO()
    torch.save({"x": Reduce(os.system, f"touch '{marker}'")}, buf)
    path = _plant(fam, "meta", Reduce(torch.storage._load_from_bytes, buf.getvalue()))
    return Hostile(path, "torch.storage._load_from_bytes", _marker_fired(marker), (path,))


def ext_opcode_registered_to_os_system(fam, tmp: Path) -> Hostile:
    """EXT1 resolves a code through copyreg's registry; here a site hook registers 0xF1 -> os.system."""
    marker = tmp / "PWNED-ext"
    site = tmp / "ext_site"
    site.mkdir()
    register = "import copyreg\ncopyreg.add_extension('os', 'system', 0xF1)\n"
    (site / "sitecustomize.py").write_text(register)
    ops = b"\x82\xf1(" + binunicode(f"touch '{marker}'") + b"tR"  # EXT1 0xF1, MARK, arg, TUPLE, REDUCE
    path = _plant(fam, "meta", RawOps(ops))
    return Hostile(path, "os.system", _marker_fired(marker), (path, site), env={"PYTHONPATH": str(site)},
                   control_setup=register)


# ------------------------------------------------------------------ one test per case


def test_os_system_via_global_opcode_in_meta(sa2va, tiny, tmp_path):
    _check(sa2va, tiny, os_system_global_opcode_in_meta(tiny, tmp_path))


def test_posix_system_reduce_in_state_dict(sa2va, tiny, tmp_path):
    _check(sa2va, tiny, posix_system_reduce_in_state_dict(tiny, tmp_path))


def test_subprocess_popen_in_message_hub(sa2va, tiny, tmp_path):
    _check(sa2va, tiny, subprocess_popen_in_message_hub(tiny, tmp_path))


def test_eval_nested_deep_in_meta(sa2va, tiny, tmp_path):
    _check(sa2va, tiny, eval_nested_deep_in_meta(tiny, tmp_path))


def test_builtins_exec_in_param_schedulers(sa2va, tiny, tmp_path):
    _check(sa2va, tiny, builtins_exec_in_param_schedulers(tiny, tmp_path))


def test_payload_in_deepspeed_model_states_module(sa2va, tiny, tmp_path):
    _check(sa2va, tiny, payload_in_deepspeed_model_states_module(tiny, tmp_path))


def test_stack_global_protocol_4(sa2va, tiny, tmp_path):
    _check(sa2va, tiny, stack_global_protocol_4(tiny, tmp_path))


def test_global_of_unexpected_module_shutil_rmtree(sa2va, tiny, tmp_path):
    _check(sa2va, tiny, global_of_unexpected_module_shutil_rmtree(tiny, tmp_path))


def test_inst_opcode_protocol_0(sa2va, tiny, tmp_path):
    _check(sa2va, tiny, inst_opcode_protocol_0(tiny, tmp_path))


def test_reduce_ex_to_importlib_import_module(sa2va, tiny, tmp_path):
    _check(sa2va, tiny, reduce_ex_to_importlib_import_module(tiny, tmp_path))


def test_reduce_ex_to_torch_load_itself(sa2va, tiny, tmp_path):
    _check(sa2va, tiny, reduce_ex_to_torch_load_itself(tiny, tmp_path))


def test_torch_storage_load_from_bytes(sa2va, tiny, tmp_path):
    _check(sa2va, tiny, torch_storage_load_from_bytes(tiny, tmp_path))


def test_ext_opcode_registered_to_os_system(tiny, tmp_path):
    """Needs a fresh interpreter: the registration happens at start-up (sitecustomize)."""
    h = ext_opcode_registered_to_os_system(tiny, tmp_path)
    _check(lambda *a, env=None: run_fresh(*a, env=env), tiny, h)


def test_unregistered_ext_code_is_reported_as_corrupt(sa2va, tiny, tmp_path):
    """With nothing registered, EXT1 cannot name any global: the file is damaged (exit 3), nothing runs."""
    ops = b"\x82\xf2(" + binunicode("x") + b"tR"
    path = _plant(tiny, "meta", RawOps(ops))
    guard = Guard((path, tiny.base), tiny.out)
    r = sa2va(path, tiny.out, "--base", tiny.base)
    assert_refused(r, 3, guard, path, "extension code")


def test_deeply_nested_tuple_key_is_refused_not_a_crash(sa2va, tiny, tmp_path):
    depth = 1_000_000
    ops = b"}" + b")" + b"\x85" * depth + b"K\x01s"  # {((((...),),),): 1}: EMPTY_DICT, key, value, SETITEM
    path = _plant(tiny, "meta", RawOps(ops))
    guard = Guard((path, tiny.base), tiny.out)
    r = sa2va(path, tiny.out, "--base", tiny.base, timeout=60)
    assert_refused(r, 3, guard, path)


# ------------------------------------------------------------------ control


_BUILDERS = [
    os_system_global_opcode_in_meta, posix_system_reduce_in_state_dict, subprocess_popen_in_message_hub,
    eval_nested_deep_in_meta, builtins_exec_in_param_schedulers, payload_in_deepspeed_model_states_module,
    stack_global_protocol_4, global_of_unexpected_module_shutil_rmtree, inst_opcode_protocol_0,
    reduce_ex_to_importlib_import_module, reduce_ex_to_torch_load_itself, torch_storage_load_from_bytes,
    ext_opcode_registered_to_os_system,
]


def test_every_payload_is_live_under_plain_torch_load(make_family, tmp_path):
    """Control: each planted file really runs its payload when loaded the usual unsafe way.

    Without this, a payload that silently failed to build would make its refusal test meaningless.
    """
    cases = []
    for build in _BUILDERS:
        case_dir = tmp_path / build.__name__
        case_dir.mkdir()
        fam = make_family("sa2va-1b")
        fam.ckpt = dataclasses.replace(fam.ckpt, path=_copy(fam.ckpt.path, case_dir / "iter_100.pth"))
        cases.append((build.__name__, build(fam, case_dir)))
    script = ["import sys, torch, copyreg"]
    for name, h in cases:
        script += [h.control_setup, "try:", f"    torch.load({str(h.ckpt)!r}, weights_only=False)",
                   "except BaseException as e:", f"    print({name!r}, type(e).__name__, e, file=sys.stderr)"]
    p = subprocess.run([sys.executable, "-c", "\n".join(script)], capture_output=True, text=True,
                       timeout=120, check=False)
    time.sleep(0.3)  # Popen'ed touch
    dead = [name for name, h in cases if not h.fired()]
    assert not dead, f"payloads that did not fire under plain torch.load: {dead}\n{p.stderr[-3000:]}"


def _copy(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes())
    return dst
