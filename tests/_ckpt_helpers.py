"""Builders for real training-checkpoint files used by the read-stage tests.

Everything is written with the real ``torch.save`` and real mmengine objects,
so the pickles carry exactly the globals a Sa2VA run writes.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import pickle
import sys
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from sa2va_convert.testing.training_checkpoint import deepspeed_parts

# --------------------------------------------------------------------------------------------
# Audit hook: proves nothing was executed or imported through pickle's default machinery
# --------------------------------------------------------------------------------------------

FORBIDDEN_EVENTS = (
    "pickle.find_class",  # only the default find_class raises it: ours must never reach it
    "os.system",
    "subprocess.Popen",
    "os.exec",
    "os.posix_spawn",
    "os.spawn",
    "os.fork",
    "os.startfile",
    "exec",
    "ctypes.dlopen",
)
_recording = threading.local()
_hook_installed = False


def _audit(event: str, args: tuple) -> None:
    events = getattr(_recording, "events", None)
    if events is not None and event.startswith(FORBIDDEN_EVENTS):
        events.append((event, repr(args)[:200]))


@contextlib.contextmanager
def forbidden_events() -> Iterator[list]:
    """Collect forbidden audit events raised in this thread while the block runs."""
    global _hook_installed
    # pickle decodes protocol-0 strings with codecs that Python imports on first use; an import of a
    # stdlib codec is not code from the input, but it shows as an 'exec' event in whichever test
    # decodes first, so the full suite's order decided whether the checkpoint fuzz test passed
    import encodings.ascii, encodings.latin_1, encodings.raw_unicode_escape, encodings.utf_8  # noqa: E401, F401
    if not _hook_installed:  # audit hooks cannot be removed; install one cheap hook per session
        sys.addaudithook(_audit)
        _hook_installed = True
    _recording.events = []
    try:
        yield _recording.events
    finally:
        _recording.events = None


# --------------------------------------------------------------------------------------------
# State dicts (FORMATS.md §3), tiny shapes, bf16
# --------------------------------------------------------------------------------------------

H, V, R = 8, 16, 4
_gen = torch.Generator().manual_seed(0)


def _t(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen).to(dtype)


def v1_state_dict() -> "OrderedDict[str, torch.Tensor]":
    lm = "mllm.model.language_model.base_model.model"
    sd: OrderedDict[str, torch.Tensor] = OrderedDict()
    for i in range(2):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[f"{lm}.model.layers.{i}.self_attn.{proj}.lora_A.default.weight"] = _t(R, H)
            sd[f"{lm}.model.layers.{i}.self_attn.{proj}.lora_B.default.weight"] = _t(H, R)
    sd[f"{lm}.model.embed_tokens.weight"] = _t(V, H)
    sd[f"{lm}.lm_head.weight"] = _t(V, H)
    for j, shape in ((0, (4 * H,)), (1, (H, 4 * H)), (3, (H, H))):
        sd[f"mllm.model.mlp1.{j}.weight"] = _t(*shape)
        sd[f"mllm.model.mlp1.{j}.bias"] = _t(shape[0])
    sd["grounding_encoder.sam2_model.sam_mask_decoder.iou_token.weight"] = _t(1, 16)
    sd["text_hidden_fcs.0.weight"] = _t(H, H)
    sd["text_hidden_fcs.0.bias"] = _t(H)
    sd["text_hidden_fcs.2.weight"] = _t(16, H)
    sd["text_hidden_fcs.2.bias"] = _t(16)
    return sd


def v2_state_dict() -> "OrderedDict[str, torch.Tensor]":
    lm = "mllm.model.language_model.base_model.model"
    sd: OrderedDict[str, torch.Tensor] = OrderedDict()
    for proj in ("q_proj", "v_proj", "gate_proj"):
        sd[f"{lm}.model.layers.0.self_attn.{proj}.lora_A.default.weight"] = _t(R, H)
        sd[f"{lm}.model.layers.0.self_attn.{proj}.lora_B.default.weight"] = _t(H, R)
    sd[f"{lm}.model.embed_tokens.modules_to_save.default.weight"] = _t(V, H)
    sd[f"{lm}.lm_head.modules_to_save.default.weight"] = _t(V, H)
    sd["grounding_encoder.sam2_model.sam_mask_decoder.mask_tokens.weight"] = _t(4, 16)
    sd["text_hidden_fcs.0.weight"] = _t(H, H)
    return sd


# --------------------------------------------------------------------------------------------
# mmengine parts
# --------------------------------------------------------------------------------------------

CFG_V1 = """\
launcher = 'pytorch'
lora_r = 4
model = dict(
    mllm=dict(
        llm_lora=dict(
            bias='none',
            lora_alpha=8,
            lora_dropout=0.05,
            r=4,
            task_type='CAUSAL_LM',
            type='peft.LoraConfig'),
        model_path='./pretrained/InternVL2_5-1B',
        type='projects.llava_sam2.models.InternVL_Slowfast'),
    pretrained_pth=None,
    special_tokens=[
        '[SEG]',
        '<p>',
        '</p>',
        '<vp>',
        '</vp>',
    ],
    type='projects.llava_sam2.models.VideoLLaVASAMModel')
optim_wrapper = dict(
    optimizer=dict(betas=(
        0.9,
        0.999,
    ), lr=4e-05, type='torch.optim.AdamW', weight_decay=0.05),
    type='DeepSpeedOptimWrapper')
path = './pretrained/InternVL2_5-1B'
prompt_template = 'xtuner.utils.PROMPT_TEMPLATE.qwen_chat'
runner_type = 'FlexibleRunner'
special_tokens = [
    '[SEG]',
    '<p>',
    '</p>',
    '<vp>',
    '</vp>',
]
strategy = dict(
    config=dict(bf16=dict(enabled=True), zero_optimization=dict(stage=2)),
    type='xtuner.engine.DeepSpeedStrategy')
template = 'qwen_chat'
work_dir = './work_dirs/sa2va_1b_finetune'
"""

CFG_V2 = """\
model = dict(
    mllm=dict(
        llm_lora=dict(
            lora_alpha=512,
            modules_to_save=[
                'embed_tokens',
                'lm_head',
            ],
            r=256,
            target_modules=[
                'q_proj',
                'v_proj',
            ],
            type='peft.LoraConfig',
            use_rslora=True),
        model_path='./pretrained/InternVL3-8B',
        type='projects.sa2va.models.InternVLMLLM'),
    pretrained_pth='./pretrained/sa2va_internvl3_8b/pytorch_model.pth',
    type='projects.sa2va.models.Sa2VAModel')
path = './pretrained/InternVL3-8B'
prompt_template = 'xtuner.utils.PROMPT_TEMPLATE.qwen_chat'
"""


def message_hub_state(name: str = "sa2va-test") -> dict:
    """A message_hub.state_dict() as mmengine's runner leaves it after some iterations."""
    from mmengine.logging import MessageHub

    hub = MessageHub.get_instance(f"{name}-{next(_hub_ids)}")
    for i in range(5):
        hub.update_scalar("train/loss", 2.0 - 0.25 * i)
        hub.update_scalar("train/lr", 4e-5)
        hub.update_scalar("train/time", 0.5 + i)
    hub.update_info("iter", 500)
    hub.update_info("epoch", 0)
    hub.update_info("max_iters", 1000)
    hub.update_info("loop_stage", "train")
    hub.update_info("eta", np.float64(123.5))
    hub.update_info("best_score", np.float32(0.75))
    hub.update_info("seen", np.int64(4000))
    hub.update_info("flag", np.bool_(True))
    hub.update_info("window", np.arange(6, dtype=np.float32).reshape(2, 3))
    return hub.state_dict()


_hub_ids = itertools.count()


def mmengine_meta(cfg: str = CFG_V1) -> dict:
    return {
        "epoch": 0,
        "iter": 500,
        "cfg": cfg,
        "experiment_name": "sa2va_1b_finetune_20250101_000000",
        "seed": 42,
        "time": "20250101_010203",
        "mmengine": "0.10.7",
        "dataset_meta": {"classes": ("vessel",)},
    }


def param_schedulers() -> list:
    return [
        {"start_factor": 1e-5, "end_factor": 1.0, "total_iters": 50, "base_values": [4e-5],
         "last_step": 500, "by_epoch": False, "_get_lr_called_within_step": False,
         "_last_value": [4e-5]},
    ]


def mmengine_checkpoint(state_dict: dict, *, cfg: str = CFG_V1, **extra: Any) -> dict:
    ckpt = {
        "meta": mmengine_meta(cfg),
        "message_hub": message_hub_state(),
        "state_dict": state_dict,
        "param_schedulers": param_schedulers(),
    }
    ckpt.update(extra)
    return ckpt


def save(obj: Any, path: Path, **kwargs: Any) -> Path:
    torch.save(obj, path, **kwargs)
    return path


# --------------------------------------------------------------------------------------------
# Crafting pickles
# --------------------------------------------------------------------------------------------


class Reduce:
    """An object whose pickle calls ``fn(*args)`` on load: how hostile files are made."""

    def __init__(self, fn: Callable, *args: Any):
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple:
        return self.fn, self.args


def zip_records(path: Path) -> dict[str, bytes]:
    with open(path, "rb") as f:
        reader = torch._C.PyTorchFileReader(f)
        return {name: reader.get_record(name) for name in reader.get_all_records()}


def write_torch_zip(path: Path, records: dict[str, bytes]) -> Path:
    """Write records with torch's own zip writer (so alignment and layout match torch.save)."""
    writer = torch._C.PyTorchFileWriter(str(path))
    for name, data in records.items():
        if name in ("version", ".data/serialization_id"):
            continue  # the writer adds these itself
        writer.write_record(name, data, len(data))
    writer.write_end_of_file()
    del writer
    return path


def rewrite_data_pkl(src: Path, dst: Path, transform: Callable[[bytes], bytes]) -> Path:
    records = zip_records(src)
    records["data.pkl"] = transform(records["data.pkl"])
    return write_torch_zip(dst, records)


def write_raw_data_pkl(path: Path, data_pkl: bytes) -> Path:
    """A torch zip whose data.pkl is exactly these bytes (no storages)."""
    return write_torch_zip(path, {"data.pkl": data_pkl, ".format_version": b"1", "byteorder": b"little"})


def write_legacy_raw(path: Path, main_pickle: bytes) -> Path:
    """A legacy (non-zip) torch file whose main pickle is exactly these bytes."""
    buf = io.BytesIO()
    pickle.dump(0x1950A86A20F9469CFC6C, buf, protocol=2)  # torch's legacy magic number
    pickle.dump(1001, buf, protocol=2)
    pickle.dump({"protocol_version": 1001, "little_endian": True,
                 "type_sizes": {"short": 2, "int": 4, "long": 4}}, buf, protocol=2)
    buf.write(main_pickle)
    pickle.dump([], buf, protocol=2)
    path.write_bytes(buf.getvalue())
    return path


def file_fingerprint(path: Path) -> tuple:
    import hashlib

    st = os.stat(path)
    return hashlib.sha256(path.read_bytes()).hexdigest(), st.st_mtime_ns, st.st_size, st.st_mode


# --------------------------------------------------------------------------------------------
# DeepSpeed stand-ins registered under the real module names (writing side only)
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def fake_deepspeed_modules() -> Iterator[dict]:
    """Classes that pickle under DeepSpeed's real global names, without DeepSpeed installed.

    sys.modules is restored on exit, so the reading side runs without them.
    """
    import dataclasses
    import enum
    import types

    saved = {k: v for k, v in sys.modules.items() if k == "deepspeed" or k.startswith("deepspeed.")}
    names = [
        "deepspeed", "deepspeed.runtime", "deepspeed.runtime.zero", "deepspeed.runtime.zero.config",
        "deepspeed.runtime.fp16", "deepspeed.runtime.fp16.loss_scaler", "deepspeed.utils",
        "deepspeed.utils.tensor_fragment",
    ]
    modules = {n: types.ModuleType(n) for n in names}

    class ZeroStageEnum(int, enum.Enum):
        disabled = 0
        optimizer_states = 1
        gradients = 2
        weights = 3

    class LossScalerBase:
        def __init__(self, cur_scale: float):
            self.cur_scale = cur_scale
            self.dynamic = False

    class LossScaler(LossScalerBase):
        pass

    class DynamicLossScaler(LossScalerBase):
        def __init__(self, init_scale: float = 2.0**16, scale_window: int = 1000):
            super().__init__(init_scale)
            self.cur_iter = 0
            self.last_overflow_iter = -1
            self.scale_factor = 2.0
            self.scale_window = scale_window
            self.dynamic = True

    @dataclasses.dataclass
    class fragment_address:  # noqa: N801 - DeepSpeed's own spelling
        numel: int
        start: int

    placements = {
        "deepspeed.runtime.zero.config": [ZeroStageEnum],
        "deepspeed.runtime.fp16.loss_scaler": [LossScalerBase, LossScaler, DynamicLossScaler],
        "deepspeed.utils.tensor_fragment": [fragment_address],
    }
    for mod_name, classes in placements.items():
        for cls in classes:
            cls.__module__ = mod_name
            cls.__qualname__ = cls.__name__
            setattr(modules[mod_name], cls.__name__, cls)
    try:
        sys.modules.update(modules)
        yield {"ZeroStageEnum": ZeroStageEnum, "LossScaler": LossScaler,
               "DynamicLossScaler": DynamicLossScaler, "fragment_address": fragment_address}
    finally:
        for n in names:
            sys.modules.pop(n, None)
        sys.modules.update(saved)


def deepspeed_files(folder: Path, state_dict: dict) -> tuple[Path, Path]:
    """(model-states file, optimizer-states file) shaped like DeepSpeed 0.19's ZeRO-2 output."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(state_dict)
    with fake_deepspeed_modules() as ds:
        model_states = {
            **deepspeed_parts(OrderedDict(state_dict), 500),  # the keys next to ``module`` (FORMATS.md §2)
            "dp_world_size": 2,
            "ds_config": {"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}},
            "ds_version": "0.19.8",
            "meta": mmengine_meta(),
            "message_hub": message_hub_state(),
            "param_schedulers": param_schedulers(),
        }
        numel = sum(t.numel() for t in state_dict.values())
        offsets = list(itertools.accumulate([0] + [t.numel() for t in state_dict.values()]))
        optim_states = {
            "optimizer_state_dict": {
                "loss_scaler": ds["DynamicLossScaler"](),
                "dynamic_loss_scale": True,
                "overflow": False,
                "clip_grad": 1.0,
                "base_optimizer_state": {
                    "state": {0: {"step": torch.tensor(500.0), "exp_avg": torch.zeros(numel // 2),
                                  "exp_avg_sq": torch.zeros(numel // 2)}},
                    "param_groups": [{"lr": 4e-5, "betas": (0.9, 0.999), "eps": 1e-8, "params": [0]}],
                },
                "single_partition_of_fp32_groups": [torch.zeros(numel // 2)],
                "zero_stage": ds["ZeroStageEnum"].gradients,
                "group_paddings": [0],
                "partition_count": [2],
                "ds_version": "0.19.8",
                "param_slice_mappings": [OrderedDict(
                    (n, ds["fragment_address"](numel=state_dict[n].numel(), start=offsets[i]))
                    for i, n in enumerate(names)
                )],
            },
            "ds_config": {"zero_optimization": {"stage": 2}},
            "ds_version": "0.19.8",
        }
        model_path = save(model_states, folder / "mp_rank_00_model_states.pt")
        optim_path = save(optim_states, folder / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt")
    return model_path, optim_path
