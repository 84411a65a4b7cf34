"""mmengine-style regenerated config text, as stored in a checkpoint's ``meta['cfg']``.

The converter reads LoRA settings, template, base path and special tokens
from this text's syntax tree, so fixtures must carry text shaped like what
mmengine writes (FORMATS.md §2): no import lines, top-level names sorted,
variables already substituted, every imported object a quoted dotted string,
dicts written as ``dict(key=value, ...)`` with sorted keys, plus the runner
keys xtuner's train script adds. The values are plausible, not upstream's.
"""

from __future__ import annotations

from .layouts import SA2VA_TOKENS, Preset, get_preset

_WIDTH = 96


def _fmt(value: object, indent: int = 0) -> str:
    """Python-literal text of a config value; long containers are broken one item per line."""
    flat = _flat(value)
    if len(flat) + indent <= _WIDTH or not isinstance(value, (dict, list, tuple)):
        return flat
    pad = " " * (indent + 4)
    if isinstance(value, dict):
        items = [f"{pad}{k}={_fmt(v, indent + 4)}" for k, v in sorted(value.items())]
        return "dict(\n" + ",\n".join(items) + ")"
    open_, close = ("[", "]") if isinstance(value, list) else ("(", ")")
    items = [f"{pad}{_fmt(v, indent + 4)}" for v in value]
    return open_ + "\n" + ",\n".join(items) + ",\n" + " " * indent + close


def _flat(value: object) -> str:
    if isinstance(value, dict):
        return "dict(" + ", ".join(f"{k}={_flat(v)}" for k, v in sorted(value.items())) + ")"
    if isinstance(value, list):
        return "[" + ", ".join(_flat(v) for v in value) + "]"
    if isinstance(value, tuple):
        inner = ", ".join(_flat(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    return repr(value)


def render(values: dict[str, object]) -> str:
    """Top-level assignments, sorted by name, as mmengine's ``pretty_text`` lays them out."""
    return "".join(f"{name} = {_fmt(values[name])}\n" for name in sorted(values))


_BASE_PATHS = {
    "sa2va-1b": "./pretrained/InternVL2_5-1B",
    "sa2va-4b": "./pretrained/InternVL2_5-4B",
    "sa2va-8b": "./pretrained/InternVL2_5-8B",
    "sa2va-internvl3": "./pretrained/InternVL3-2B",
    "sa2va-qwen2_5-vl": "./pretrained/Qwen2.5-VL-3B-Instruct",
    "sa2va-qwen3-vl": "./pretrained/Qwen3-VL-4B-Instruct",
    "sa2va-qwen3-vl-sam3": "./pretrained/Qwen3-VL-4B-Instruct",
    "sa2va-llava-1.5": "./pretrained/llava/llava-1.5-7b-hf",
}
_PRETRAINED = {
    "sa2va-internvl3": "./pretrained/sa2va_internvl3_2b/pytorch_model.pth",
    "sa2va-qwen2_5-vl": "./pretrained/sa2va_qwen2_5_vl_3b/pytorch_model.pth",
    "sa2va-qwen3-vl": "./pretrained/sa2va_qwen3_vl_4b/pytorch_model.pth",
    "sa2va-qwen3-vl-sam3": "./pretrained/sa2va_qwen3_vl_4b_sam3/pytorch_model.pth",
    "sa2va-llava-1.5": "./pretrained/sa2va_llava_1_5_7b/pytorch_model.pth",
}
_QWEN_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def training_config_text(
    preset: str | Preset,
    *,
    lora_r: int,
    lora_alpha: float,
    use_rslora: bool = False,
    extra_tokens: tuple[str, ...] = (),
    path: str | None = None,
    pretrained_pth: str | None = None,
    work_dir: str | None = None,
    max_iters: int = 1000,
) -> str:
    """The ``meta['cfg']`` text of a fine-tune run of this family.

    ``llm_lora`` sits where upstream puts it, at ``model.mllm.llm_lora``;
    ``use_rslora`` is written only when true (upstream configs never set it).
    v2 configs point ``pretrained_pth`` at the Sa2VA weights the LoRA was
    trained on; v1 configs have ``pretrained_pth = None``.
    """
    p = get_preset(preset)
    path = path or _BASE_PATHS[p.name]
    if p.version == "v2":
        pretrained_pth = pretrained_pth or _PRETRAINED[p.name]
    name = p.name.replace("-", "_") + "_finetune"
    work_dir = work_dir or f"./work_dirs/{name}"
    special = list(SA2VA_TOKENS) + list(extra_tokens)

    lora: dict[str, object] = dict(
        type="peft.LoraConfig",
        r=lora_r,
        lora_alpha=lora_alpha,
        lora_dropout=0.05,
        bias="none",
        task_type="CAUSAL_LM",
    )
    if use_rslora:
        lora["use_rslora"] = True
    if p.version == "v2":
        lora["modules_to_save"] = ["embed_tokens", "lm_head"]
    if p.layout == "qwen-vl":
        lora["target_modules"] = list(_QWEN_TARGETS)

    tokenizer = dict(
        type="transformers.AutoTokenizer.from_pretrained",
        pretrained_model_name_or_path=path,
        trust_remote_code=True,
        padding_side="right",
    )
    pkg = "projects.llava_sam2.models" if p.version == "v1" else "projects.sa2va.models"
    if p.version == "v1":
        mllm_type, model_type = f"{pkg}.InternVL_Slowfast", f"{pkg}.VideoLLaVASAMModel"
    elif p.layout == "internvl":
        mllm_type, model_type = f"{pkg}.InternVLMLLM", f"{pkg}.Sa2VAModel"
    elif p.layout == "llava":  # projects/sa2va/models/mllm/llava.py; LoRA on every Linear of the LLM
        mllm_type, model_type = f"{pkg}.mllm.llava.LlavaVLM", f"{pkg}.Sa2VAModel"
    else:
        mllm_type, model_type = f"{pkg}.QwenVLMLLM", f"{pkg}.Sa2VAModel"
    mllm: dict[str, object] = dict(
        type=mllm_type,
        model_path=path,
        freeze_llm=True,
        freeze_visual_encoder=True,
        llm_lora=lora,
    )
    if p.version == "v1":
        mllm["special_tokens"] = special
    model = dict(
        type=model_type,
        mllm=mllm,
        tokenizer=tokenizer,
        grounding_encoder=dict(type=f"{pkg}.SAM2TrainRunner"),
        loss_mask=dict(
            type="third_parts.mmdet.models.losses.CrossEntropyLoss", use_sigmoid=True, reduction="mean", loss_weight=2.0
        ),
        loss_dice=dict(
            type="third_parts.mmdet.models.losses.DiceLoss",
            use_sigmoid=True,
            activate=True,
            reduction="mean",
            naive_dice=True,
            eps=1.0,
            loss_weight=0.5,
        ),
        pretrained_pth=pretrained_pth,
        template=p.template,
        special_tokens=special,
        frozen_sam2_decoder=False,
        loss_sample_points=True,
        bs=2,
    )
    if p.layout in ("qwen-vl", "llava"):
        model["arch_type"] = "qwen" if p.layout == "qwen-vl" else "llava"
    if p.grounding == "sam3":
        # upstream's SAM3 configs: the tracker runner of projects/sa2va/models/sam3_train.py, 1008-px input
        model["grounding_encoder"] = dict(type=f"{pkg}.Sam3TrackerTrainRunner", ckpt_path="sam3.pt")
        model["grounding_img_size"] = 1008
    lr = 4e-5
    values: dict[str, object] = dict(
        accumulative_counts=4,
        batch_size=2,
        betas=(0.9, 0.999),
        dataloader_num_workers=4,
        default_hooks=dict(
            checkpoint=dict(
                type="mmengine.hooks.CheckpointHook",
                by_epoch=False,
                interval=1000,
                max_keep_ckpts=2,
                save_optimizer=False,
            ),
            logger=dict(type="mmengine.hooks.LoggerHook", interval=10, log_metric_by_epoch=False),
            param_scheduler=dict(type="mmengine.hooks.ParamSchedulerHook"),
            sampler_seed=dict(type="mmengine.hooks.DistSamplerSeedHook"),
            timer=dict(type="mmengine.hooks.IterTimerHook"),
        ),
        env_cfg=dict(
            cudnn_benchmark=False,
            dist_cfg=dict(backend="nccl"),
            mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
        ),
        launcher="pytorch",
        load_from=None,
        log_level="INFO",
        log_processor=dict(by_epoch=False),
        lr=lr,
        max_epochs=1,
        max_length=8192,
        max_norm=1,
        model=model,
        optim_type="torch.optim.AdamW",
        optim_wrapper=dict(
            type="DeepSpeedOptimWrapper",
            optimizer=dict(type="torch.optim.AdamW", lr=lr, betas=(0.9, 0.999), weight_decay=0.05),
        ),
        param_scheduler=[
            dict(
                type="mmengine.optim.LinearLR",
                start_factor=1e-05,
                by_epoch=True,
                begin=0,
                end=0.05,
                convert_to_iter_based=True,
            ),
            dict(
                type="mmengine.optim.CosineAnnealingLR",
                eta_min=0.0,
                by_epoch=True,
                begin=0.05,
                end=1,
                convert_to_iter_based=True,
            ),
        ],
        path=path,
        pretrained_pth=pretrained_pth,
        prompt_template=f"xtuner.utils.PROMPT_TEMPLATE.{p.template}",
        randomness=dict(seed=None, deterministic=False),
        resume=False,
        runner_type="FlexibleRunner",
        save_steps=1000,
        save_total_limit=2,
        special_tokens=special,
        strategy=dict(
            type="xtuner.engine.DeepSpeedStrategy",
            config=dict(
                bf16=dict(enabled=True),
                fp16=dict(enabled=False, initial_scale_power=16),
                gradient_accumulation_steps="auto",
                gradient_clipping="auto",
                train_micro_batch_size_per_gpu="auto",
                zero_allow_untested_optimizer=True,
                zero_force_ds_cpu_optimizer=False,
                zero_optimization=dict(overlap_comm=True, stage=2),
            ),
            exclude_frozen_parameters=True,
            gradient_accumulation_steps=4,
            gradient_clipping=1,
            sequence_parallel_size=1,
            train_micro_batch_size_per_gpu=2,
        ),
        template=p.template,
        tokenizer=tokenizer,
        train_cfg=dict(type="xtuner.engine.runner.TrainLoop", max_iters=max_iters),
        visualizer=None,
        warmup_ratio=0.05,
        weight_decay=0.05,
        work_dir=work_dir,
    )
    return render(values)
