"""``python -m sa2va_convert.testing``: write fixtures from the shell (README demo, benchmarks).

    python -m sa2va_convert.testing tiny-example DIR [--preset P]
    python -m sa2va_convert.testing generate --preset P --sizes real|tiny --out DIR [--fill fast]

``generate`` writes ``DIR/base`` and ``DIR/work_dirs/exp/iter_100.pth`` (+
``last_checkpoint``); with ``--sizes real`` the preset may also name a real
model (``sa2va-26b``, ``sa2va-internvl3-8b``, ...).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .fixtures import make_tiny_example, write_base_folder, write_training_checkpoint
from .layouts import MODEL_ALIASES, PRESETS, Sizes, get_preset, hf_layout, param_count


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def main(argv: list[str] | None = None) -> int:
    names = [*PRESETS, *MODEL_ALIASES]
    ap = argparse.ArgumentParser(
        prog="python -m sa2va_convert.testing",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tiny-example", help="tiny base folder + mmengine work dir (seconds)")
    t.add_argument("dir", type=Path)
    t.add_argument("--preset", default="sa2va-1b", choices=list(PRESETS))
    g = sub.add_parser("generate", help="base folder + checkpoint, tiny or with real shapes")
    g.add_argument("--preset", required=True, choices=names)
    g.add_argument("--sizes", choices=("tiny", "real"), default="tiny")
    g.add_argument("--out", type=Path, required=True)
    g.add_argument("--fill", choices=("random", "fast"), default="random")
    g.add_argument("--dtype", default="bf16")
    g.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    start = time.perf_counter()
    if args.cmd == "tiny-example":
        ex = make_tiny_example(args.dir, args.preset)
        base, ckpt = ex.base_dir, ex.checkpoint.path
    else:
        preset = get_preset(args.preset)
        sizes = Sizes.real(args.preset) if args.sizes == "real" else Sizes.tiny()
        n = param_count(hf_layout(preset, sizes))
        print(f"{args.preset} ({preset.name} family, {args.sizes}): {n / 1e6:.1f} M parameters", file=sys.stderr)
        out = args.out.resolve()
        base = write_base_folder(out / "base", preset, sizes, dtype=args.dtype, seed=args.seed, fill=args.fill)
        work = out / "work_dirs" / "exp"
        ckpt = write_training_checkpoint(
            work / "iter_100.pth", preset, sizes, seed=args.seed + 1, dtype=args.dtype, fill=args.fill, base_dir=base
        ).path
        (work / "last_checkpoint").write_text(str(ckpt))
    print(f"base\t{base}\t{_human(_size(base))}")
    print(f"checkpoint\t{ckpt}\t{_human(_size(ckpt))}")
    print(f"seconds\t{time.perf_counter() - start:.1f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
