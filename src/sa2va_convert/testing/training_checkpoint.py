"""Write fixture training checkpoints: ``torch.save``d dicts shaped like mmengine/xtuner/DeepSpeed output.

The pieces (``mmengine_parts``: meta, message_hub with REAL mmengine objects, param_schedulers;
``deepspeed_parts``: the model-states keys) are shared by ``write_training_checkpoint`` here and
``finetune.write_segmenting_finetune``, so neither imports the other's private code.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import dtypes
from .config_text import training_config_text
from .layouts import Preset, Sizes, get_preset, training_layout
from .values import make_tensor

CHECKPOINT_FORMATS = ("mmengine", "state_dict", "deepspeed-module")
FIXED_TIME = "20250101_120000"  # mmengine's meta['time'] format; fixed for byte-identical files

__all__ = [
    "CHECKPOINT_FORMATS",
    "FIXED_TIME",
    "FixtureCheckpoint",
    "write_training_checkpoint",
    "check_base_fits",
    "mmengine_parts",
    "deepspeed_parts",
]


@dataclass(frozen=True)
class FixtureCheckpoint:
    """What ``write_training_checkpoint`` wrote, with what a test needs to check a conversion."""

    path: Path
    preset: str
    sizes: Sizes
    fmt: str
    lora_r: int
    lora_alpha: float
    use_rslora: bool
    extra_tokens: tuple[str, ...]
    keys: tuple[str, ...] = field(repr=False)

    @property
    def scale(self) -> float:
        """The PEFT merge scale: alpha/r, or alpha/sqrt(r) with rsLoRA."""
        return self.lora_alpha / (math.sqrt(self.lora_r) if self.use_rslora else self.lora_r)

    @property
    def vocab_rows(self) -> int:
        return self.sizes.vocab + len(self.extra_tokens)


def write_training_checkpoint(
    path: str | Path,
    preset: str | Preset,
    sizes: Sizes | None = None,
    *,
    seed: int = 1,
    dtype: str = "bf16",
    lora_r: int | None = None,
    lora_alpha: float | None = None,
    use_rslora: bool = False,
    extra_tokens: tuple[str, ...] = (),
    fmt: str = "mmengine",
    zero_lora_b: bool = False,
    config_text: bool = True,
    base_dir: str | Path | None = None,
    include_frozen_sam2: bool = False,
    iteration: int = 100,
    fill: str = "random",
) -> FixtureCheckpoint:
    """``torch.save`` a fine-tune checkpoint of this family (keys: ``training_layout``).

    fmt: 'mmengine' (``{'state_dict', 'meta', 'message_hub', 'param_schedulers'}``,
    the default iter_N.pth), 'state_dict' (the bare dict), or 'deepspeed-module'
    (a ``mp_rank_00_model_states.pt``-like dict: ``module`` + DeepSpeed keys +
    mmengine's keys; put it at ``.../iter_N.pth/mp_rank_00_model_states.pt`` for
    the directory form). ``base_dir``, if given, is written as the config's
    ``path`` and must have the embedding rows these sizes imply. ``lora_r``
    defaults to ``sizes.lora_r``; ``lora_alpha`` to ``sizes.lora_alpha``, or to
    2*r when only ``lora_r`` is given (scale 2.0, as every shipped config).
    """
    p = get_preset(preset)
    s = sizes or Sizes.tiny()
    dtype = dtypes.normalise(dtype)
    if fmt not in CHECKPOINT_FORMATS:
        raise ValueError(f"fmt must be one of {CHECKPOINT_FORMATS}, not {fmt!r}")
    r = lora_r or s.lora_r
    alpha = lora_alpha if lora_alpha is not None else (s.lora_alpha if lora_r is None else 2 * r)
    extra = tuple(extra_tokens)
    if base_dir is not None:
        check_base_fits(Path(base_dir), p, s)

    layout = training_layout(p, s, extra_tokens=len(extra), lora_r=r, include_frozen_sam2=include_frozen_sam2)
    sd: OrderedDict[str, torch.Tensor] = OrderedDict()
    for name, shape in layout.items():
        zero = zero_lora_b and ".lora_B." in name
        sd[name] = make_tensor(name, shape, dtype, seed=seed, fill=fill, zero=zero)

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "state_dict":
        obj: object = sd
    else:
        mm = mmengine_parts(
            p,
            r,
            alpha,
            use_rslora,
            extra,
            iteration,
            seed,
            str(base_dir) if base_dir is not None else None,
            str(out.parent),
            config_text,
        )
        if fmt == "mmengine":
            obj = {"state_dict": sd, **mm}
        else:
            obj = {**deepspeed_parts(sd, iteration), **mm}
    torch.save(obj, out)
    return FixtureCheckpoint(
        path=out,
        preset=p.name,
        sizes=s,
        fmt=fmt,
        lora_r=r,
        lora_alpha=alpha,
        use_rslora=use_rslora,
        extra_tokens=extra,
        keys=tuple(layout),
    )


def check_base_fits(base: Path, p: Preset, s: Sizes) -> None:
    """A base folder given to a checkpoint writer must have the embedding rows its sizes imply."""
    cfg = json.loads((base / "config.json").read_text())
    sub = cfg.get("text_config") if p.layout in ("qwen-vl", "llava") else cfg.get("llm_config")
    rows = (sub or {}).get("vocab_size")
    if rows not in (s.vocab, s.raw_vocab):
        raise ValueError(f"{base}: vocab_size {rows} does not fit sizes.vocab {s.vocab}")


def mmengine_parts(
    p: Preset,
    r: int,
    alpha: float,
    use_rslora: bool,
    extra: tuple[str, ...],
    iteration: int,
    seed: int,
    base_path: str | None,
    work_dir: str,
    with_cfg: bool,
) -> dict:
    """``meta``, ``message_hub`` and ``param_schedulers`` as mmengine's FlexibleRunner saves them."""
    import numpy as np
    from mmengine.logging import HistoryBuffer  # test extra; the converter never imports it

    name = p.name.replace("-", "_") + "_finetune"
    max_iters = max(iteration * 10, 1000)
    meta: dict = {}
    if with_cfg:
        meta["cfg"] = training_config_text(
            p,
            lora_r=r,
            lora_alpha=alpha,
            use_rslora=use_rslora,
            extra_tokens=extra,
            path=base_path,
            work_dir=work_dir,
            max_iters=max_iters,
        )
    meta.update(
        seed=seed,
        experiment_name=f"{name}_{FIXED_TIME}",
        time=FIXED_TIME,
        mmengine_version="0.10.7",
        epoch=0,
        iter=iteration,
    )

    rng = np.random.default_rng(seed)
    scalars = {}
    for key, lo, hi in (
        ("train/lr", 1e-6, 4e-5),
        ("train/loss", 0.5, 3.0),
        ("train/loss_mask", 0.1, 1.0),
        ("train/loss_dice", 0.1, 1.0),
        ("train/llm_loss", 0.2, 2.0),
        ("train/grad_norm", 0.5, 5.0),
        ("train/time", 1.0, 2.0),
        ("train/data_time", 0.01, 0.1),
    ):
        buf = HistoryBuffer()
        for _ in range(5):
            buf.update(np.float64(rng.uniform(lo, hi)), 1)
        scalars[key] = buf
    message_hub = {
        "log_scalars": scalars,
        "runtime_info": {
            "epoch": 0,
            "iter": iteration,
            "max_epochs": 1,
            "max_iters": max_iters,
            "experiment_name": meta["experiment_name"],
            "dataset_meta": None,
            "last_ckpt": f"{work_dir}/iter_{iteration}.pth",
            "loss_scale": np.float32(1.0),
            "seed": np.int64(seed),
        },
        "resumed_keys": {"epoch": False, "iter": False, "max_iters": True, "dataset_meta": False},
    }
    warm = max(1, max_iters // 20)
    param_schedulers = [
        {
            "start_factor": 1e-05,
            "end_factor": 1.0,
            "begin": 0,
            "end": warm,
            "by_epoch": False,
            "last_step": min(iteration, warm),
            "total_iters": warm,
            "verbose": False,
            "_global_step": iteration,
            "base_values": [4e-05],
            "_last_value": [4e-05],
        },
        {
            "T_max": max_iters - warm,
            "eta_min": 0.0,
            "begin": warm,
            "end": max_iters,
            "by_epoch": False,
            "last_step": max(0, iteration - warm),
            "verbose": False,
            "_global_step": iteration,
            "base_values": [4e-05],
            "_last_value": [np.float64(3.9e-05)],
        },
    ]
    return {"meta": meta, "message_hub": message_hub, "param_schedulers": param_schedulers}


def deepspeed_parts(sd: OrderedDict, iteration: int) -> dict:
    """The model-states keys DeepSpeed writes next to ``module`` (FORMATS.md §2)."""
    shapes = OrderedDict((k, torch.Size(v.shape)) for k, v in sd.items())
    return {
        "module": sd,
        "buffer_names": [],
        "optimizer": None,
        "param_shapes": [shapes],
        "frozen_param_shapes": None,
        "shared_params": {},
        "frozen_param_fragments": None,
        "lr_scheduler": None,
        "data_sampler": None,
        "random_ltd": None,
        "sparse_tensor_module_names": set(),
        "skipped_steps": 0,
        "global_steps": iteration,
        "global_samples": iteration * 8,
        "dp_world_size": 1,
        "mp_world_size": 1,
        "ds_config": {
            "bf16": {"enabled": True},
            "fp16": {"enabled": False},
            "gradient_accumulation_steps": 4,
            "gradient_clipping": 1.0,
            "train_micro_batch_size_per_gpu": 2,
            "zero_optimization": {"stage": 2, "overlap_comm": True},
        },
        "ds_version": "0.16.4",
    }
