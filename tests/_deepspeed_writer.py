"""Write REAL DeepSpeed checkpoint directories on CPU, for tests/test_deepspeed.py.

Run under ``torchrun --nproc_per_node 2 tests/_deepspeed_writer.py OUT_DIR``
(gloo backend, DeepSpeed's CPU accelerator, no compiled ops). For each
variant it trains a tiny model whose parameter names look like Sa2VA training
keys for a few steps, calls ``engine.save_checkpoint(OUT/<variant>,
tag='iter_10.pth')`` with mmengine-style client state, and then writes what
the engine itself holds -- fp32 master weights (``safe_get_full_fp32_param``),
gathered 16-bit module weights, frozen weights, buffers -- plus DeepSpeed's
own ``zero_to_fp32`` consolidation to ``OUT/<variant>/expected.pt``. The tests
compare our reader against those values, so the layout knowledge in
``sa2va_convert.read.deepspeed`` is checked against the real library rather
than against our reading of it.

This file is a test helper, not part of the package: it imports DeepSpeed
and mmengine, which the converter never does.
"""

from __future__ import annotations

import json
import os
import sys
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

os.environ.setdefault("DS_ACCELERATOR", "cpu")

ITER_TAG = "iter_10.pth"
STEPS = 3
LORA_R = 4
H = 12
D = 7  # odd decoder width: groups need DeepSpeed's alignment padding, parameters straddle ranks
VOCAB = 37

# name -> (deepspeed config overrides, bf16?)
VARIANTS: dict[str, dict] = {
    # Sa2VA's default: ZeRO-2, bf16 (DeepSpeedZeroOptimizer, bf16_ file prefix)
    "zero2_bf16": {"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}},
    # ZeRO-2 in fp32 with per-parameter alignment padding and round-robin order (no prefix)
    "zero2_fp32_aligned": {
        "zero_optimization": {"stage": 2, "parameter_alignment": True, "round_robin_gradients": True},
    },
    # ZeRO-1 bf16 with fp32 gradient accumulation: DeepSpeed picks BF16_Optimizer
    "zero1_bf16": {
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": 1},
        "data_types": {"grad_accum_dtype": "fp32"},
    },
    # ZeRO-3 bf16 with small sub-groups so that fp32_flat_groups has several entries per rank
    "zero3_bf16": {
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": 3, "sub_group_size": 300, "stage3_param_persistence_threshold": 0},
    },
}


class Tokens(nn.Module):
    """A bare parameter owned by a module (like SAM2's no_mem_embed)."""

    def __init__(self, *shape: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(*shape))

    def forward(self) -> torch.Tensor:
        return self.weight


class LoraLinear(nn.Module):
    """PEFT's LoRA wrapper shape: base_layer + lora_A.default + lora_B.default."""

    def __init__(self, d_in: int, d_out: int, bias: bool = True):
        super().__init__()
        self.base_layer = nn.Linear(d_in, d_out, bias=bias)
        self.lora_A = nn.ModuleDict({"default": nn.Linear(d_in, LORA_R, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(LORA_R, d_out, bias=False)})
        self.base_layer.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_B["default"](self.lora_A["default"](x)) * 2.0


class PositionEmbeddingRandom(nn.Module):
    """SAM's pe_layer: a persistent buffer inside the mask decoder."""

    def __init__(self):
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(2, D))
        self.register_buffer("scratch", torch.zeros(3), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., :2] @ self.positional_encoding_gaussian_matrix.to(x.dtype)


def _nest(root: nn.Module, dotted: str, leaf: nn.Module) -> None:
    """Attach ``leaf`` at a dotted path, creating plain container modules on the way."""
    parts = dotted.split(".")
    node = root
    for part in parts[:-1]:
        if not hasattr(node, part):
            node.add_module(part, nn.Module())
        node = getattr(node, part)
    node.add_module(parts[-1], leaf)


LM = "mllm.model.language_model.base_model.model"
DEC = "grounding_encoder.sam2_model.sam_mask_decoder"


class ToySa2VA(nn.Module):
    """Sa2VA-shaped names: LoRA LLM, trained embeddings/head/mlp1/decoder/text_hidden_fcs, frozen rest."""

    def __init__(self) -> None:
        super().__init__()
        _nest(self, f"{LM}.model.embed_tokens", nn.Embedding(VOCAB, H))
        for i in range(2):
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                _nest(self, f"{LM}.model.layers.{i}.self_attn.{proj}", LoraLinear(H, H, bias=proj != "o_proj"))
            _nest(self, f"{LM}.model.layers.{i}.input_layernorm", nn.LayerNorm(H))
        _nest(self, f"{LM}.lm_head", nn.Linear(H, VOCAB, bias=False))
        _nest(self, "mllm.model.vision_model.encoder.layers.0.mlp.fc1", nn.Linear(H, 2 * H))
        mlp1 = nn.Sequential(nn.LayerNorm(H), nn.Linear(H, H), nn.GELU(), nn.Linear(H, H))
        _nest(self, "mllm.model.mlp1", mlp1)
        _nest(self, f"{DEC}.iou_token", nn.Embedding(1, D))
        _nest(self, f"{DEC}.mask_tokens", nn.Embedding(4, D))
        _nest(self, f"{DEC}.transformer.layers.0.self_attn.q_proj", nn.Linear(D, D))
        _nest(self, f"{DEC}.pe_layer", PositionEmbeddingRandom())
        _nest(self, "grounding_encoder.sam2_model.no_mem_embed", Tokens(1, 1, D))
        _nest(self, "grounding_encoder.sam2_model.image_encoder.trunk.blocks.0.attn.qkv", nn.Linear(D, 3 * D))
        fcs = nn.Sequential(nn.Linear(H, H), nn.ReLU(), nn.Linear(H, D), nn.Dropout(0.0))
        _nest(self, "text_hidden_fcs", fcs)
        # a tied parameter: DeepSpeed records it in shared_params, not in param_shapes
        tied = nn.Linear(D, D)
        tied.weight = self.get_submodule(f"{DEC}.transformer.layers.0.self_attn.q_proj").weight
        tied.bias = None
        _nest(self, f"{DEC}.transformer.layers.0.self_attn.k_proj", tied)

        self.get_submodule("mllm.model.vision_model").requires_grad_(False)
        self.get_submodule("grounding_encoder.sam2_model.image_encoder").requires_grad_(False)
        self.get_submodule("grounding_encoder.sam2_model.no_mem_embed").requires_grad_(False)
        for name, p in self.named_parameters():
            if ".layers.0.input_layernorm" in name:
                p.requires_grad_(False)

    def forward(self, seed: int) -> torch.Tensor:
        """Call every leaf module (ZeRO-3 gathers parameters per module forward)."""
        g = torch.Generator().manual_seed(seed)
        dtype = next(p for p in self.parameters()).dtype
        loss = torch.zeros((), dtype=torch.float32)
        for module in self.modules():
            if any(True for _ in module.children()) and not isinstance(module, (LoraLinear,)):
                continue
            if isinstance(module, nn.Linear):
                out = module(torch.randn(3, module.in_features, generator=g).to(dtype))
            elif isinstance(module, nn.Embedding):
                out = module(torch.randint(0, module.num_embeddings, (5,), generator=g))
            elif isinstance(module, nn.LayerNorm):
                out = module(torch.randn(3, module.normalized_shape[0], generator=g).to(dtype))
            elif isinstance(module, LoraLinear):
                out = module(torch.randn(3, module.base_layer.in_features, generator=g).to(dtype))
            elif isinstance(module, Tokens):
                out = module()
            elif isinstance(module, PositionEmbeddingRandom):
                out = module(torch.randn(3, 4, generator=g).to(dtype))
            else:
                continue
            loss = loss + (out.float() ** 2).mean()
        return loss


def _param_groups(model: nn.Module) -> list[dict]:
    """Two groups, as mmengine's optimizer constructor makes (decay / no decay)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}]


def _client_state() -> dict:
    """What mmengine's FlexibleRunner merges into the model-states file (FORMATS.md §2)."""
    import numpy as np
    from mmengine.logging import HistoryBuffer

    buf = HistoryBuffer()
    for v in (1.5, 1.25, 1.0):
        buf.update(np.float64(v), 1)
    cfg = (
        "llm_lora = dict(\n    lora_alpha=8, r=4, task_type='CAUSAL_LM', type='peft.LoraConfig')\n"
        "path = '/models/Sa2VA-1B'\n"
        "template = 'xtuner.utils.PROMPT_TEMPLATE.qwen_chat'\n"
    )
    return {
        "meta": {"cfg": cfg, "seed": 7, "experiment_name": "toy_20250101_120000", "time": "20250101_120000",
                 "mmengine": "0.10.7", "epoch": 0, "iter": 10},
        "message_hub": {"log_scalars": {"train/loss": buf},
                        "runtime_info": {"iter": 10, "loss_scale": np.float32(1.0), "seed": np.int64(7)},
                        "resumed_keys": {"iter": False}},
        "param_schedulers": [{"base_values": [1e-3], "last_step": 10}],
    }


def _gathered(model: nn.Module, stage: int, fp32_training: bool) -> tuple[dict, dict, dict]:
    """(fp32 master, 16-bit module params, buffers) as full tensors, from the live engine.

    In fp32 training the module parameters are the very buffer the optimizer
    copies its fp32 partitions into, so they ARE the master weights; we use them
    there because DeepSpeed 0.19.8's safe_get_full_fp32_param returns other
    parameters' values under round_robin_gradients (the checkpoint, zero_to_fp32
    and the module all agree with each other).
    """
    from deepspeed.utils import safe_get_full_fp32_param
    import deepspeed

    fp32: dict[str, torch.Tensor] = OrderedDict()
    sixteen: dict[str, torch.Tensor] = OrderedDict()
    for name, p in model.named_parameters():
        if p.requires_grad and not fp32_training:
            fp32[name] = safe_get_full_fp32_param(p).detach().cpu().clone()
        if stage == 3:
            with deepspeed.zero.GatheredParameters([p]):
                sixteen[name] = p.detach().cpu().clone()
        else:
            sixteen[name] = p.detach().cpu().clone()
    if fp32_training:
        fp32 = OrderedDict((n, sixteen[n].clone()) for n, p in model.named_parameters() if p.requires_grad)
    buffers = OrderedDict((n, b.detach().cpu().clone()) for n, b in model.named_buffers() if "scratch" not in n)
    return fp32, sixteen, buffers


def _write_variant(name: str, overrides: dict, out: Path, rank: int) -> None:
    import deepspeed
    import torch.distributed as dist

    torch.manual_seed(1234)
    model = ToySa2VA()
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        **overrides,
    }
    optimizer = torch.optim.AdamW(_param_groups(model), lr=1e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    for step in range(STEPS):
        loss = engine(seed=step * 10 + rank)
        engine.backward(loss)
        engine.step()
    target = out / name
    engine.save_checkpoint(str(target), tag=ITER_TAG, client_state=_client_state(), save_latest=False)
    stage = overrides["zero_optimization"]["stage"]
    fp32_training = not overrides.get("bf16", {}).get("enabled", False)
    fp32, sixteen, buffers = _gathered(engine.module, stage, fp32_training)
    shared = {"grounding_encoder.sam2_model.sam_mask_decoder.transformer.layers.0.self_attn.k_proj.weight":
              "grounding_encoder.sam2_model.sam_mask_decoder.transformer.layers.0.self_attn.q_proj.weight"}
    trainable = [n for n, p in engine.module.named_parameters() if p.requires_grad]
    dist.barrier()
    if rank == 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        try:
            reference = get_fp32_state_dict_from_zero_checkpoint(str(target), tag=ITER_TAG)
            reference = OrderedDict((k, v.contiguous().clone()) for k, v in reference.items())
        except ValueError as e:  # zero_to_fp32 refuses BF16_Optimizer (ZeRO-1 bf16) checkpoints
            reference = {"__refused__": str(e)}
        torch.save({"fp32": fp32, "module16": sixteen, "buffers": buffers, "shared": shared,
                    "trainable": trainable, "zero_to_fp32": reference, "ds_version": deepspeed.__version__,
                    "stage": stage},
                   target / "expected.pt")
        _write_truncated_copy(target / ITER_TAG, target / "iter_10_truncated.pth")
        (target / "done.json").write_text(json.dumps({"variant": name}))
    dist.barrier()
    if hasattr(engine, "destroy"):
        engine.destroy()


def _write_truncated_copy(src: Path, dst: Path) -> None:
    """The same checkpoint with rank 1's first fp32 partition 3 elements short (a wrong-size partition).

    Done here because rewriting a DeepSpeed file needs DeepSpeed's classes
    (this is our own freshly written file, so the unrestricted load is fine).
    """
    import shutil

    shutil.copytree(src, dst)
    victim = next(dst.glob("*zero_pp_rank_1_mp_rank_00_optim_states.pt"))
    obj = torch.load(victim, weights_only=False)
    osd = obj["optimizer_state_dict"]
    key = "fp32_flat_groups" if "fp32_flat_groups" in osd else "single_partition_of_fp32_groups"
    osd[key][0] = osd[key][0][:-3].clone()
    torch.save(obj, victim)


def main() -> None:
    out = Path(sys.argv[1])
    only = sys.argv[2].split(",") if len(sys.argv) > 2 else list(VARIANTS)
    import deepspeed
    import deepspeed.comm.torch  # noqa: F401  (the attribute path resolves to the torch package)

    # DeepSpeed's CPU accelerator JIT-compiles a shared-memory allreduce op in
    # init_distributed (a C++ build, ~1 minute); gloo does the job without it.
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo")
    rank = int(os.environ.get("RANK", "0"))
    for name in only:
        _write_variant(name, VARIANTS[name], out, rank)


if __name__ == "__main__":
    main()
