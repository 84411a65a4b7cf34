#!/usr/bin/env python3
"""Benchmark sa2va-convert against a full-load baseline and the disk floor, on one machine.

    .venv/bin/python bench/bench_convert.py --models sa2va-1b,sa2va-4b
    python3 bench/bench_convert.py --models sa2va-8b --merge-devices cpu,cuda   # GPU machine

For every model it generates realistic-size synthetic inputs with the project's
fixture generator (``sa2va_convert.testing``, ``Sizes.real``: the published
shapes, ``fill='fast'`` values), then measures, each in a fresh child process
started after ``sync`` and a page-cache drop (``echo 3 > /proc/sys/vm/drop_caches``,
when the machine lets us; otherwise every run reads warm inputs, said in the output):

  (a) ``sa2va-convert CKPT OUT --base BASE`` -- the CLI, once per ``--merge-devices`` entry
      (and once more with ``--no-read-back`` if ``--no-read-back-too``);
  (b) a plain full-load baseline (this file, ``_baseline``): every base tensor and the
      whole checkpoint in memory in fp32, LoRA merged, cast, ``safetensors`` ``save_file``
      per shard -- the memory profile of the official conversion (whole model in fp32);
  (c) ``cp -r BASE`` -- the disk floor (reading and writing the same bytes).

Wall time always includes a final ``sync`` (the tool fsyncs its shards; ``cp`` and
``save_file`` do not), so every run pays for writing its bytes. Peak RSS is
``ru_maxrss`` of the child (exact, from ``wait4``; it counts touched file-backed
mapped pages too), plus the peaks of ``RssAnon`` / ``RssFile`` summed over the
child's process tree, sampled from ``/proc`` every 10 ms (a vfork'd child shares the parent's memory
until it execs, so a tree sampled then counts the parent twice: the other processes seen are listed,
``sampled_other_processes``, with the root's own ``VmHWM``). The ``--dry-run --json``
estimates (peak RAM, disk) are compared with the measured peak RSS and output size.

Results: a markdown table on stdout (and ``--md FILE``), everything in ``--json FILE``.
Generated inputs live under ``--work`` (default /tmp/sa2va-bench) and are deleted at
the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GIB = 1024**3


# ----------------------------------------------------------------------------- machine


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def machine_info(work: Path) -> dict:
    cpu = ""
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    flags = ""
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("flags"):
            flags = line
            break
    mem = {}
    for line in _read("/proc/meminfo").splitlines():
        k, _, v = line.partition(":")
        mem[k] = int(v.split()[0]) * 1024 if v.strip() else 0
    du = shutil.disk_usage(work)
    dev = fstype = "?"
    best = ""
    for line in _read("/proc/mounts").splitlines():
        parts = line.split()
        if len(parts) >= 3 and str(work).startswith(parts[1]) and len(parts[1]) > len(best):
            best, dev, fstype = parts[1], parts[0], parts[2]
    info = {
        "hostname": platform.node(),
        "nproc": os.cpu_count(),
        "cpu": cpu or platform.processor(),
        "cpu_avx512": "avx512f" in flags,
        "cpu_avx512_bf16": "avx512_bf16" in flags,
        "mem_total_gib": round(mem.get("MemTotal", 0) / GIB, 1),
        "mem_available_gib": round(mem.get("MemAvailable", 0) / GIB, 1),
        "disk": f"{dev} ({fstype}) mounted at {best}",
        "disk_total_gib": round(du.total / GIB, 1),
        "disk_free_gib": round(du.free / GIB, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }
    # torch is asked in a child: the bench process stays small, so a child's ru_maxrss (which
    # starts from the parent's pages at fork) measures the child, not the bench
    probe = ("import json, torch; d = {'torch': torch.__version__, 'torch_threads': torch.get_num_threads()}\n"
             "if torch.cuda.is_available(): d['gpu'] = torch.cuda.get_device_name(0)\n"
             "print(json.dumps(d))")
    try:
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False)
        info.update(json.loads(out.stdout.strip().splitlines()[-1]))
    except Exception as e:  # noqa: BLE001 - informational only
        info["torch"] = f"unknown ({e})"
    return info


def loadavg() -> float:
    try:
        return float(_read("/proc/loadavg").split()[0])
    except (IndexError, ValueError):
        return -1.0


def wait_for_quiet(max_load: float, max_wait: float) -> None:
    """Other people's jobs share the machine: start a timed run only once the 1-minute load is low."""
    if max_load <= 0:
        return
    deadline = time.time() + max_wait
    while loadavg() > max_load and time.time() < deadline:
        time.sleep(5)


def mem_available() -> int:
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


# ----------------------------------------------------------------------------- caches


def can_drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def prepare_cache(drop: bool, warm_paths: list[Path]) -> None:
    """Either drop the page cache (cold runs) or read every input once (warm runs)."""
    os.sync()
    if drop:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return
    for p in warm_paths:
        files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())
        for q in files:
            with open(q, "rb", buffering=0) as f:
                while f.read(64 * 1024 * 1024):
                    pass


# ----------------------------------------------------------------------------- measuring


def _tree(root: int) -> list[int]:
    pids, i = [root], 0
    while i < len(pids):
        p = pids[i]
        i += 1
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                kids = _read(f"/proc/{p}/task/{tid}/children").split()
                pids.extend(int(k) for k in kids)
        except OSError:
            pass
    return pids


def _status_hwm(pid: int) -> tuple[int, int, int, int]:
    """(VmRSS, RssAnon, RssFile + RssShmem, VmHWM) in bytes; zeros for a process that is gone."""
    rss = anon = file = hwm = 0
    for line in _read(f"/proc/{pid}/status").splitlines():
        if line.startswith("VmHWM:"):
            hwm = int(line.split()[1]) * 1024
        elif line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
        elif line.startswith("RssAnon:"):
            anon = int(line.split()[1]) * 1024
        elif line.startswith(("RssFile:", "RssShmem:")):
            file += int(line.split()[1]) * 1024
    return rss, anon, file, hwm


class TreeSampler(threading.Thread):
    def __init__(self, pid: int, interval: float = 0.01):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.stop = threading.Event()
        self.peak_rss = self.peak_anon = self.peak_file = 0
        self.anon_at_peak = self.file_at_peak = 0
        self.samples = 0
        # the process count of the tree at its peak and the most seen, and the root's own VmHWM (the
        # kernel's high-water mark, what ru_maxrss reports at exit) at that sample and at its most: a
        # tree peak above ru_maxrss is either another process or a high-water mark the kernel missed
        self.procs_at_peak = self.max_procs = 0
        self.root_hwm_at_peak = self.root_hwm = 0
        self.others: dict[int, str] = {}  # pid -> command line of every other process seen in the tree

    def run(self) -> None:
        while not self.stop.is_set():
            rss = anon = file = 0
            tree = _tree(self.pid)
            hwm = 0
            for p in tree:
                r, a, f, h = _status_hwm(p)
                rss, anon, file = rss + r, anon + a, file + f
                if p == self.pid:
                    hwm = h
                elif p not in self.others:
                    self.others[p] = _read(f"/proc/{p}/cmdline").replace("\0", " ").strip()[:300]
            self.samples += 1
            self.max_procs = max(self.max_procs, len(tree))
            self.root_hwm = max(self.root_hwm, hwm)
            if rss > self.peak_rss:
                self.peak_rss, self.anon_at_peak, self.file_at_peak = rss, anon, file
                self.procs_at_peak, self.root_hwm_at_peak = len(tree), hwm
            self.peak_anon = max(self.peak_anon, anon)
            self.peak_file = max(self.peak_file, file)
            self.stop.wait(self.interval)


def measure(cmd: list[str], *, log: Path, env: dict | None = None, cwd: Path | None = None) -> dict:
    """Run ``cmd`` in a fresh child; wall (incl. a final sync), ru_maxrss, sampled anon/file peaks."""
    load = loadavg()
    # log.name + suffix, not with_suffix: the slugs hold dots ("....a.0.cpu") that with_suffix would eat
    out_log, err_log = log.parent / f"{log.name}.out", log.parent / f"{log.name}.err"
    with open(out_log, "wb") as out, open(err_log, "wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=cwd)
        sampler = TreeSampler(proc.pid)
        sampler.start()
        _, status, ru = os.wait4(proc.pid, 0)
        t_exit = time.perf_counter()
        proc.returncode = os.waitstatus_to_exitcode(status)
        sampler.stop.set()
        sampler.join()
        os.sync()
        t1 = time.perf_counter()
    res = {
        "cmd": " ".join(cmd),
        "rc": proc.returncode,
        "wall_s": round(t1 - t0, 2),
        "wall_exit_s": round(t_exit - t0, 2),
        "sync_s": round(t1 - t_exit, 2),
        "user_s": round(ru.ru_utime, 2),
        "sys_s": round(ru.ru_stime, 2),
        "maxrss_bytes": ru.ru_maxrss * 1024,
        "sampled_peak_rss_bytes": sampler.peak_rss,
        "sampled_anon_at_peak_bytes": sampler.anon_at_peak,
        "sampled_file_at_peak_bytes": sampler.file_at_peak,
        "sampled_peak_anon_bytes": sampler.peak_anon,
        "sampled_peak_file_bytes": sampler.peak_file,
        "samples": sampler.samples,
        "sampled_procs_at_peak": sampler.procs_at_peak,
        "sampled_max_procs": sampler.max_procs,
        "sampled_root_hwm_at_peak_bytes": sampler.root_hwm_at_peak,
        "sampled_root_hwm_bytes": sampler.root_hwm,
        "sampled_other_processes": sorted(set(sampler.others.values())),
        "load1_before": load,
        "log": str(log),
    }
    if proc.returncode != 0:
        res["stderr_tail"] = err_log.read_text(errors="replace")[-2000:]
    return res


def tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------- inputs


def generate(model: str, work: Path, base_dtype: str, log: Path) -> dict:
    """Base folder + mmengine checkpoint with the published shapes (cached by a marker file)."""
    d = work / model
    marker = d / "generated.json"
    want = {"model": model, "dtype": base_dtype, "fill": "fast", "generator": "sa2va_convert.testing generate"}
    if marker.is_file() and json.loads(marker.read_text()).get("key") == want:
        return json.loads(marker.read_text())
    shutil.rmtree(d, ignore_errors=True)
    cmd = [sys.executable, "-m", "sa2va_convert.testing", "generate", "--preset", model, "--sizes", "real",
           "--out", str(d), "--fill", "fast", "--dtype", base_dtype]
    t0 = time.perf_counter()
    # log.name + suffix, not with_suffix: the slugs hold dots ("....a.0.cpu") that with_suffix would eat
    out_log, err_log = log.parent / f"{log.name}.out", log.parent / f"{log.name}.err"
    with open(out_log, "wb") as out, open(err_log, "wb") as err:
        subprocess.run(cmd, check=True, stdout=out, stderr=err)
    ckpt = d / "work_dirs" / "exp" / "iter_100.pth"
    probe = ("import json, sys; from sa2va_convert.testing.layouts import Sizes, get_preset, hf_layout, param_count\n"
             "m = sys.argv[1]; s = Sizes.real(m)\n"
             "print(json.dumps({'params': param_count(hf_layout(get_preset(m), s)), 'scale': s.lora_alpha / s.lora_r}))")
    facts = json.loads(subprocess.run([sys.executable, "-c", probe, model], check=True, capture_output=True,
                                      text=True).stdout.strip().splitlines()[-1])
    info = {
        "key": want,
        "cmd": " ".join(cmd),
        "seconds": round(time.perf_counter() - t0, 1),
        "base": str(d / "base"),
        "checkpoint": str(ckpt),
        "base_bytes": tree_bytes(d / "base"),
        "checkpoint_bytes": ckpt.stat().st_size,
        "params": facts["params"],
        "lora_scale": facts["scale"],
    }
    marker.write_text(json.dumps(info, indent=1))
    return info


# ----------------------------------------------------------------------------- baseline (b)


def baseline_main(argv: list[str]) -> int:
    """(b): the whole model in fp32 in memory, then save_file per shard (the official memory profile).

    Deliberately plain and independent of the converter's code: names via the
    hand-written rules of ``sa2va_convert.testing.reference`` (FORMATS.md §3-4),
    the checkpoint with ``torch.load(weights_only=False)`` (our own fixture only).
    """
    ap = argparse.ArgumentParser(prog="bench_convert.py _baseline")
    ap.add_argument("checkpoint")
    ap.add_argument("base")
    ap.add_argument("out")
    ap.add_argument("--scale", type=float, required=True)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--max-shard-bytes", type=int, default=5 * 10**9)
    a = ap.parse_args(argv)
    import torch
    from safetensors.torch import load_file, save_file

    from sa2va_convert.testing.reference import training_name_to_hf

    target = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.dtype]
    base = Path(a.base)
    index = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    model: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index.values())):
        for k, v in load_file(str(base / shard)).items():
            model[k] = v.to(torch.float32) if v.is_floating_point() else v
    obj = torch.load(a.checkpoint, map_location="cpu", weights_only=False)
    sd = obj["state_dict"] if "state_dict" in obj else obj.get("module", obj)
    la, lb = {}, {}
    for key, t in sd.items():
        if not isinstance(t, torch.Tensor):
            continue
        name = training_name_to_hf(key)
        if name.endswith(".lora_A.default.weight"):
            la[name[: -len(".lora_A.default.weight")] + ".weight"] = t.to(torch.float32)
        elif name.endswith(".lora_B.default.weight"):
            lb[name[: -len(".lora_B.default.weight")] + ".weight"] = t.to(torch.float32)
        else:
            model[name] = t.to(torch.float32) if t.is_floating_point() else t.clone()
    del obj, sd
    for name, a_ in la.items():
        model[name] += a.scale * (lb[name] @ a_)
    del la, lb
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in model.items():
        nbytes = t.numel() * (torch.finfo(target).bits // 8 if t.is_floating_point() else t.element_size())
        if shards[-1] and size + nbytes > a.max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    weight_map = {}
    for i, names in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        part = {}
        for n in names:  # cast (and free the fp32 copy) shard by shard, as save_pretrained does
            t = model.pop(n)
            part[n] = t.to(target) if t.is_floating_point() else t
            weight_map[n] = fname
        save_file(part, str(out / fname), metadata={"format": "pt"})
        del part
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return 0


# ----------------------------------------------------------------------------- comparing outputs


def compare_outputs(a: Path, b: Path) -> dict:
    """Tensor-by-tensor equality of two HF folders (same names, dtypes, bytes)."""
    import torch
    from safetensors import safe_open

    def index(p: Path) -> dict:
        return json.loads((p / "model.safetensors.index.json").read_text())["weight_map"]

    ia, ib = index(a), index(b)
    if set(ia) != set(ib):
        return {"equal": False, "why": f"names differ: {sorted(set(ia) ^ set(ib))[:5]}"}
    diff = []
    elems = max_ulp = 0
    by_shard: dict[str, list[str]] = {}
    for n, s in ia.items():
        by_shard.setdefault(s, []).append(n)
    for s, names in sorted(by_shard.items()):
        with safe_open(str(a / s), framework="pt") as fa:
            for n in names:
                ta = fa.get_tensor(n)
                with safe_open(str(b / ib[n]), framework="pt") as fb:
                    tb = fb.get_tensor(n)
                if ta.dtype != tb.dtype or not torch.equal(ta, tb):
                    diff.append(n)
                    if ta.dtype == tb.dtype and ta.is_floating_point() and ta.shape == tb.shape:
                        # how far apart, in units in the last place of the output dtype (issue 26: a GPU
                        # merge's sums may round to a neighbouring value): neighbours in the integer view
                        # of the bits are one ulp apart (same sign; a sign change counts as far)
                        ints = {2: torch.int16, 4: torch.int32}.get(ta.element_size())
                        if ints is not None:
                            da = ta.view(ints).to(torch.int64) - tb.view(ints).to(torch.int64)
                            elems += int((da != 0).sum())
                            max_ulp = max(max_ulp, int(da.abs().max()))
    return {"equal": not diff, "tensors": len(ia), "different": diff[:10], "n_different": len(diff),
            "elements_different": elems, "max_ulp": max_ulp}


# ----------------------------------------------------------------------------- main


def rev_tree(rev: str, work: Path) -> Path:
    """``src/`` (and ``keymaps/``, found beside it) of commit ``rev``, unpacked under ``work``: run with PYTHONPATH."""
    dest = work / f"rev-{rev}"
    if not (dest / "src").is_dir():
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", rev, "src", "keymaps"], cwd=REPO, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest / "src"


def cli_cmd() -> list[str]:
    # the console script's entry (``sa2va-convert`` = ``_entry:main``), as users run it: ``-m sa2va_convert.cli``
    # skipped its exit path (os._exit after a finished command, no torch teardown: ~0.5-1 s)
    return [sys.executable, "-m", "sa2va_convert"]


def dry_run(gen: dict, out: Path, extra: list[str]) -> dict:
    cmd = [*cli_cmd(), gen["checkpoint"], str(out), "--base", gen["base"], "--dry-run", "--json", *extra]
    res = subprocess.run(cmd, check=True, capture_output=True, text=True)
    plan = json.loads(res.stdout)["plan"]
    return {"cmd": " ".join(cmd), "peak_ram_bytes": plan["estimates"]["peak_ram_bytes"],
            "disk_bytes": plan["estimates"]["disk_bytes"], "tensors": plan.get("counts"),
            "shards": len(plan.get("shards", []))}


def fmt_gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def run_model(model: str, args, work: Path, drops: list[bool], logs: Path, res: dict, save) -> dict:
    print(f"== {model}: generating inputs", file=sys.stderr, flush=True)
    gen = generate(model, work, args.base_dtype, logs / f"{model}.generate")
    print(f"   base {fmt_gib(gen['base_bytes'])} GiB, checkpoint {fmt_gib(gen['checkpoint_bytes'])} GiB, "
          f"{gen['params'] / 1e9:.2f} B params ({gen['seconds']} s)", file=sys.stderr, flush=True)
    base, ckpt = Path(gen["base"]), Path(gen["checkpoint"])
    warm = [base, ckpt]
    res.update({"model": model, "inputs": gen, "runs": []})
    common = ["--dtype", args.out_dtype, *(["--max-shard-size", args.max_shard_size] if args.max_shard_size else [])]
    outs = (args.out_root or work) / model
    outs.mkdir(parents=True, exist_ok=True)
    out_a, out_b, out_c = outs / "out_a", outs / "out_b", outs / "out_c"
    cli_extra = args.cli_extra.split()
    res["dry_run"] = dry_run(gen, out_a, common)
    res["dry_runs"] = {}  # per (a) variant: the estimate for that merge device and read-back setting

    def estimate_for(extra_args: list[str]) -> dict:
        key = " ".join(extra_args)
        if key not in res["dry_runs"]:
            res["dry_runs"][key] = dry_run(gen, out_a, [*common, *extra_args])
        return res["dry_runs"][key]

    save()
    env = dict(os.environ, PYTHONUNBUFFERED="1")

    kinds = [k.strip() for k in args.runs.split(",") if k.strip()]
    for rep, drop in [(r, d) for d in drops for r in range(args.repeat)]:
        cache = "dropped" if drop else "warm"
        for kind in kinds:
            variants: list[tuple[str, list[str], Path, dict]] = []
            if kind == "a":
                for dev in args.merge_devices.split(","):
                    cmd = [*cli_cmd(), str(ckpt), str(out_a), "--base", str(base), "--json", "-q", "--force",
                           "--merge-device", dev, *common]
                    shown = " ".join(["(a) sa2va-convert", *cli_extra]) + f", merge {dev}"
                    variants.append((shown, [*cmd, *cli_extra], out_a, {"merge_device": dev}))
                    if args.also_rev:  # the same command with the code of another commit (before/after, one run)
                        src = rev_tree(args.also_rev, work)
                        variants.append((shown.replace("(a) sa2va-convert", f"(a) sa2va-convert at {args.also_rev}"),
                                         [*cmd, *cli_extra], out_a,
                                         {"merge_device": dev, "rev": args.also_rev, "_pythonpath": str(src)}))
                    if args.also_src and dev == args.merge_devices.split(",")[0]:  # ... or the sources in a folder
                        # (a machine without git: the device), for the first merge device only
                        name = args.also_label or "other"
                        variants.append((shown.replace("(a) sa2va-convert", f"(a) sa2va-convert at {name}"),
                                         [*cmd, *cli_extra], out_a,
                                         {"merge_device": dev, "rev": name,
                                          "_pythonpath": os.pathsep.join([str(args.also_src.resolve()),
                                                                          *os.environ.get("PYTHONPATH", "").split(os.pathsep)[1:]])}))
                    for spec in (args.also_env or []) if dev == args.merge_devices.split(",")[0] else []:
                        # the same command and code with environment settings (an A/B of a knob, one run)
                        name, _, assigns = spec.partition(":")
                        setting = dict(a.split("=", 1) for a in assigns.split(",") if "=" in a)
                        variants.append((shown.replace("(a) sa2va-convert", f"(a) sa2va-convert [{name}]"),
                                         [*cmd, *cli_extra], out_a,
                                         {"merge_device": dev, "rev": name, "_env": setting}))
                    if args.read_back_too:
                        variants.append((shown.replace("(a) sa2va-convert", "(a) sa2va-convert --read-back"),
                                         [*cmd, *cli_extra, "--read-back"], out_a,
                                         {"merge_device": dev, "read_back": True}))
                    if args.no_read_back_too:
                        variants.append((shown.replace("(a) sa2va-convert", "(a) sa2va-convert --no-read-back"),
                                         [*cmd, *cli_extra, "--no-read-back"], out_a,
                                         {"merge_device": dev, "read_back": False}))
                    if args.defaults_too and cli_extra:
                        variants.append((f"(a) sa2va-convert (all defaults), merge {dev}", cmd, out_a,
                                         {"merge_device": dev, "defaults": True}))
            elif kind == "b":
                need = 4 * gen["params"] + gen["checkpoint_bytes"]
                if need > 0.85 * mem_available() and not args.force_baseline:
                    res["runs"].append({"label": "(b) full-load fp32 baseline", "kind": "b", "skipped":
                                        f"needs ~{fmt_gib(need)} GiB (4 B/param + checkpoint), "
                                        f"MemAvailable {fmt_gib(mem_available())} GiB"})
                    print(f"   (b) skipped: {res['runs'][-1]['skipped']}", file=sys.stderr, flush=True)
                    continue
                cmd = [sys.executable, str(Path(__file__).resolve()), "_baseline", str(ckpt), str(base), str(out_b),
                       "--scale", str(gen["lora_scale"]), "--dtype", args.out_dtype]
                variants.append(("(b) full-load fp32 baseline", cmd, out_b, {}))
            elif kind == "c":
                variants.append(("(c) cp -r base", ["cp", "-r", str(base), str(out_c)], out_c, {}))
            else:
                raise SystemExit(f"unknown run kind {kind!r} (a, b, c)")
            for label, cmd, out, extra in variants:
                shutil.rmtree(out, ignore_errors=True)
                wait_for_quiet(args.max_load, args.max_wait)
                prepare_cache(drop, warm)
                print(f"   {label} (load {loadavg():.2f}) ...", file=sys.stderr, flush=True)
                slug = (f"{model}.{cache}.{kind}.{rep}.{extra.get('merge_device', '')}"
                        f"{'.rb' if extra.get('read_back') else ''}{'.defaults' if extra.get('defaults') else ''}")
                extra = dict(extra)
                run_env = dict(env, PYTHONPATH=extra.pop("_pythonpath")) if "_pythonpath" in extra else env
                if "_env" in extra:
                    setting = extra.pop("_env")
                    run_env = {**run_env, **setting}
                    extra["env"] = setting
                if extra.get("rev"):
                    slug += f".{extra['rev']}"
                m = measure(cmd, log=logs / slug, env=run_env, cwd=REPO)
                m.update(label=label, kind=kind, repeat=rep, cache=cache, **extra)
                if kind == "a" and not extra.get("rev"):
                    m["estimate"] = estimate_for(["--merge-device", extra["merge_device"],
                                                  *(["--read-back"] if extra.get("read_back") else [])])
                if kind == "a" and m["rc"] == 0:  # the tool's own account of its threads (--json: stage_seconds)
                    try:
                        tool = json.loads((logs / f"{slug}.out").read_text())
                        m["stage_seconds"] = tool.get("stage_seconds")
                        m["phase_seconds"] = tool.get("phase_seconds")  # outside the write stage (issue 26)
                        m["tool_seconds"] = tool.get("seconds")
                        m["window_bytes"] = (tool.get("plan") or {}).get("estimates", {}).get("window_bytes")
                    except (OSError, ValueError):
                        m["stage_seconds"] = None
                    if m.get("window_bytes"):
                        print(f"      writer window {m['window_bytes'] / 2**20:.0f} MiB (chosen in this run)",
                              file=sys.stderr, flush=True)
                    if m.get("phase_seconds"):
                        print("      phases: " + ", ".join(f"{k} {v:.2f}" for k, v in m["phase_seconds"].items())
                              + f"; exit after {m['wall_s'] - sum(m['phase_seconds'].values()):.2f} s",
                              file=sys.stderr, flush=True)
                    if m["stage_seconds"]:
                        from sa2va_convert.write.stage_times import summarize  # stdlib only: no torch here

                        print("      " + summarize(m["stage_seconds"]), file=sys.stderr, flush=True)
                if m["rc"] == 0:
                    m["out_bytes"] = tree_bytes(out)
                    m["out_weight_bytes"] = sum(p.stat().st_size for p in out.glob("*.safetensors"))
                    if kind == "a" and args.check_equal and out_b.is_dir():
                        # in a child: the bench process must stay small (see machine_info)
                        cmp = subprocess.run([sys.executable, str(Path(__file__).resolve()), "_compare", str(out),
                                              str(out_b)], capture_output=True, text=True, cwd=REPO,
                                             check=False)
                        m["equal_to_baseline"] = (json.loads(cmp.stdout) if cmp.returncode == 0
                                                  else {"equal": None, "why": cmp.stderr[-500:]})
                print(f"      rc {m['rc']} wall {m['wall_s']} s, maxrss {fmt_gib(m['maxrss_bytes'])} GiB "
                      f"(anon {fmt_gib(m['sampled_anon_at_peak_bytes'])}, file {fmt_gib(m['sampled_file_at_peak_bytes'])})"
                      + (f"; other processes in its tree: {m['sampled_other_processes']} (sampled tree peak "
                         f"{fmt_gib(m['sampled_peak_rss_bytes'])} GiB)" if m.get("sampled_other_processes") else "")
                      + (f"\n{m.get('stderr_tail', '')}" if m["rc"] else ""), file=sys.stderr, flush=True)
                res["runs"].append(m)
                save()
            if kind == "c" and not args.keep_outputs:
                shutil.rmtree(out_c, ignore_errors=True)
    if not args.keep_outputs:
        for o in (out_a, out_b, out_c):
            shutil.rmtree(o, ignore_errors=True)
    return res


def summarize(model_res: dict) -> list[str]:
    """One row per run; x cp and the (b)/(a) RSS ratio against the fastest (c)/(b) of the same cache state."""
    runs = [r for r in model_res["runs"] if not r.get("skipped") and r.get("rc") == 0]
    rows = []

    def best(pred):
        got = [r for r in runs if pred(r)]
        return min(got, key=lambda r: r["wall_s"]) if got else None

    for r in model_res["runs"]:
        if r.get("skipped"):
            rows.append(f"| {model_res['model']} | | {r['label']} | skipped: {r['skipped']} | | | | | | | | |")
            continue
        if r.get("rc") != 0:
            rows.append(f"| {model_res['model']} | {r.get('cache', '')} | {r['label']} | failed rc={r['rc']} "
                        "| | | | | | | | |")
            continue
        cache = r.get("cache", "")
        c = best(lambda q, cache=cache: q["kind"] == "c" and q.get("cache", "") == cache)
        b = best(lambda q, cache=cache: q["kind"] == "b" and q.get("cache", "") == cache)
        wall_c = f"{r['wall_s'] / c['wall_s']:.2f}" if c and r["kind"] != "c" else ""
        rss_b = f"{b['maxrss_bytes'] / r['maxrss_bytes']:.1f}" if b and r["kind"] == "a" else ""
        gb = r.get("out_weight_bytes") or r.get("out_bytes") or 0
        cpu_gb = f"{(r['user_s'] + r['sys_s']) / (gb / 1e9):.2f}" if gb else ""
        est = ""
        eq = r.get("equal_to_baseline")
        label = r["label"] + ("" if eq is None else (" [output == (b), bit for bit]" if eq.get("equal")
                                                      else f" [differs from (b) in {eq.get('n_different')} tensors, "
                                                            f"{eq.get('elements_different')} elements, at most "
                                                            f"{eq.get('max_ulp')} ulp]"))
        if r["kind"] == "a":
            dry = r.get("estimate") or model_res["dry_run"]
            est = (f"RAM {fmt_gib(dry['peak_ram_bytes'])} ({dry['peak_ram_bytes'] / r['maxrss_bytes'] - 1:+.0%}), "
                   f"disk {fmt_gib(dry['disk_bytes'])} ({dry['disk_bytes'] / r['out_weight_bytes'] - 1:+.0%})")
        rows.append(
            f"| {model_res['model']} | {cache} | {label} | {r['wall_s']:.1f} | {wall_c} | "
            f"{r['user_s']:.0f}+{r['sys_s']:.0f} | {cpu_gb} | {fmt_gib(r['maxrss_bytes'])} | "
            f"{fmt_gib(r['sampled_anon_at_peak_bytes'])} / {fmt_gib(r['sampled_file_at_peak_bytes'])} | "
            f"{r['load1_before']:.2f} | {rss_b} | {est} |")
    return rows


TABLE_HEAD = [
    ("| model | cache | run | wall s (incl. sync) | x cp | CPU user+sys s | CPU s/GB written | "
     "peak RSS GiB (ru_maxrss) | anon / file GiB at sampled peak | load1 before | peak RSS (b)/(a) | "
     "dry-run estimate vs measured |"),
    "|---|---|---|---|---|---|---|---|---|---|---|---|",
]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_baseline":
        return baseline_main(argv[1:])
    if argv and argv[0] == "_compare":
        print(json.dumps(compare_outputs(Path(argv[1]), Path(argv[2]))))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="sa2va-1b,sa2va-4b", help="comma list of Sizes.real names")
    ap.add_argument("--work", type=Path, default=Path("/tmp/sa2va-bench"))
    ap.add_argument("--runs", default="c,b,a",
                    help="which of a, b, c to run, in this order (b before a for --check-equal)")
    ap.add_argument("--merge-devices", default="cpu", help="comma list for (a): cpu, cuda")
    ap.add_argument("--cli-extra", default="--no-verify",
                    help="options added to (a) (default --no-verify: no round-trip load of the written model, "
                         "which needs the whole model in memory by design)")
    ap.add_argument("--also-rev", metavar="COMMIT",
                    help="also time (a) with the code of this commit (git archive; PYTHONPATH), same command")
    ap.add_argument("--also-src", type=Path, metavar="SRC",
                    help="also time (a) with the package in this src/ folder (PYTHONPATH; its other entries kept)")
    ap.add_argument("--also-label", help="how the --also-src runs are labelled (e.g. main)")
    ap.add_argument("--also-env", action="append", metavar="LABEL:VAR=VAL[,VAR=VAL]",
                    help="also time (a) with these environment settings (first merge device); repeatable")
    ap.add_argument("--read-back-too", action="store_true",
                    help="also time (a) with --read-back (every written byte read back from disk)")
    ap.add_argument("--no-read-back-too", action="store_true",
                    help="also time (a) with --no-read-back (the default since issue 14; kept for old commands)")
    ap.add_argument("--defaults-too", action="store_true", help="also time (a) with no extra options at all")
    ap.add_argument("--out-root", type=Path, help="where outputs go (default: --work), e.g. a tmpfs")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--max-load", type=float, default=0.0,
                    help="before each timed run, wait until the 1-minute load average is below this (0: don't)")
    ap.add_argument("--max-wait", type=float, default=600.0, help="... but at most this many seconds")
    ap.add_argument("--base-dtype", default="bf16", help="dtype of the generated base folder")
    ap.add_argument("--out-dtype", default="bf16")
    ap.add_argument("--max-shard-size", default=None, help="passed to (a) as --max-shard-size")
    ap.add_argument("--cache", default="auto",
                    help="drop the page cache before each run (drop; auto: if permitted) or warm the inputs (warm); "
                         "a comma list (drop,warm) runs everything once per state")
    ap.add_argument("--check-equal", action="store_true", help="compare (a)'s output with (b)'s, tensor by tensor")
    ap.add_argument("--force-baseline", action="store_true", help="run (b) even if it looks too big for RAM")
    ap.add_argument("--keep", action="store_true", help="keep the generated inputs")
    ap.add_argument("--keep-outputs", action="store_true")
    ap.add_argument("--json", type=Path, help="write every figure here")
    ap.add_argument("--md", type=Path, help="write the markdown table here")
    args = ap.parse_args(argv)

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    modes = [m.strip() for m in args.cache.split(",") if m.strip()]
    if any(m not in ("auto", "drop", "warm") for m in modes) or not modes:
        raise SystemExit(f"--cache: auto, drop, warm or a comma list of them, not {args.cache!r}")
    drops = [can_drop_caches() if m == "auto" else m == "drop" for m in modes]
    report = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([sys.executable, *sys.argv]),
        "machine": machine_info(work),
        "cache": "; ".join("dropped before every run (sync; echo 3 > /proc/sys/vm/drop_caches)" if d
                           else "warm: every input read once before every run" for d in drops),
        "models": [],
    }
    print(json.dumps(report["machine"]), file=sys.stderr, flush=True)
    def save() -> None:
        if args.json:
            args.json.write_text(json.dumps(report, indent=1))

    try:
        for model in [m.strip() for m in args.models.split(",") if m.strip()]:
            report["models"].append({"model": model, "runs": []})
            run_model(model, args, work, drops, logs, report["models"][-1], save)
            save()
            if not args.keep:
                shutil.rmtree(work / model, ignore_errors=True)
    finally:
        if args.json:
            args.json.write_text(json.dumps(report, indent=1))
    lines = [f"date {report['date']}; cache: {report['cache']}",
             "machine: " + ", ".join(f"{k}={v}" for k, v in report["machine"].items()), "", *TABLE_HEAD]
    for m in report["models"]:
        if "dry_run" in m:
            lines += summarize(m)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.md:
        args.md.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
