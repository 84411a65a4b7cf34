"""parse_embedded_config: mmengine's regenerated config text read as data, never executed."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from _ckpt_helpers import CFG_V1, CFG_V2, forbidden_events
from sa2va_convert.read.embedded_config import EmbeddedConfig, LoraSettings, Unparsed, parse_embedded_config


def test_v1_regenerated_text() -> None:
    cfg = parse_embedded_config(CFG_V1)
    assert cfg.error is None
    assert cfg.path == "./pretrained/InternVL2_5-1B"
    assert cfg.pretrained_pth is None
    assert cfg.template == "qwen_chat"
    assert cfg.special_tokens == ["[SEG]", "<p>", "</p>", "<vp>", "</vp>"]
    assert cfg.lora == LoraSettings(r=4, lora_alpha=8.0, use_rslora=None, modules_to_save=None, target_modules=None)
    assert cfg.sources == {
        "path": "path",
        "template": "template",
        "special_tokens": "special_tokens",
        "lora": "model.mllm.llm_lora",
        "r": "model.mllm.llm_lora.r",
        "lora_alpha": "model.mllm.llm_lora.lora_alpha",
    }
    assert cfg.values["optim_wrapper"]["optimizer"]["betas"] == (0.9, 0.999)
    assert cfg.values["strategy"]["type"] == "xtuner.engine.DeepSpeedStrategy"


def test_v2_regenerated_text() -> None:
    cfg = parse_embedded_config(CFG_V2)
    assert cfg.pretrained_pth == "./pretrained/sa2va_internvl3_8b/pytorch_model.pth"
    assert cfg.sources["pretrained_pth"] == "model.pretrained_pth"
    assert cfg.template == "qwen_chat" and cfg.sources["template"] == "prompt_template"
    assert cfg.lora.r == 256 and cfg.lora.lora_alpha == 512.0 and cfg.lora.use_rslora is True
    assert cfg.lora.modules_to_save == ["embed_tokens", "lm_head"]
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.sources["use_rslora"] == "model.mllm.llm_lora.use_rslora"
    assert cfg.special_tokens is None


def test_text_from_real_mmengine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Regenerate a config with mmengine itself (stand-in peft/xtuner modules) and read it back."""
    from mmengine.config import Config

    pkg = tmp_path / "stand_ins"
    (pkg / "peft").mkdir(parents=True)
    (pkg / "peft" / "__init__.py").write_text("class LoraConfig:\n    pass\n")
    (pkg / "xtuner" / "utils").mkdir(parents=True)
    (pkg / "xtuner" / "__init__.py").write_text("")
    (pkg / "xtuner" / "utils" / "__init__.py").write_text(  # xtuner's PROMPT_TEMPLATE is a ConfigDict
        "from mmengine.config import ConfigDict\nPROMPT_TEMPLATE = ConfigDict(internlm2_chat=dict(SYSTEM='x'))\n"
    )
    monkeypatch.syspath_prepend(str(pkg))
    for name in ("peft", "xtuner", "xtuner.utils"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    source = tmp_path / "sa2va_8b_finetune.py"
    source.write_text(textwrap.dedent("""
        from peft import LoraConfig
        from xtuner.utils import PROMPT_TEMPLATE
        path = './pretrained/InternVL2_5-8B'
        prompt_template = PROMPT_TEMPLATE.internlm2_chat
        lora_r = 128
        special_tokens = ['[SEG]', '<p>', '</p>', '<vp>', '</vp>']
        model = dict(
            type='VideoLLaVASAMModel',
            special_tokens=special_tokens,
            pretrained_pth=None,
            mllm=dict(model_path=path,
                      llm_lora=dict(type=LoraConfig, r=lora_r, lora_alpha=lora_r * 2, lora_dropout=0.05)))
        lr = 4e-5 * 0.5
        """))
    text = Config.fromfile(str(source)).pretty_text
    assert "import" not in text and "type='peft.LoraConfig'" in text
    assert "prompt_template = 'xtuner.utils.PROMPT_TEMPLATE.internlm2_chat'" in text
    cfg = parse_embedded_config(text)
    assert cfg.error is None
    assert cfg.path == "./pretrained/InternVL2_5-8B"
    assert cfg.lora.r == 128 and cfg.lora.lora_alpha == 256.0
    assert cfg.special_tokens == ["[SEG]", "<p>", "</p>", "<vp>", "</vp>"]
    assert cfg.values["lr"] == 2e-05
    assert cfg.template == "internlm2_chat" and cfg.sources["template"] == "prompt_template"


def test_user_source_config_is_read_without_running_it(tmp_path: Path) -> None:
    """A user may pass their config .py itself: names resolve, imports stay text."""
    marker = tmp_path / "pwned"
    text = textwrap.dedent(f"""
        import os
        from peft import LoraConfig
        from xtuner.utils import PROMPT_TEMPLATE
        os.system('touch {marker}')
        path = './pretrained/InternVL2_5-4B'
        template = "phi3_chat"
        prompt_template = PROMPT_TEMPLATE.phi3_chat
        lora_r = 128
        model = dict(
            mllm=dict(llm_lora=dict(type=LoraConfig, r=lora_r, lora_alpha=lora_r * 2, use_rslora=not True)),
            evil=__import__('os').system('touch {marker}'),
        )
        """)
    with forbidden_events() as events:
        cfg = parse_embedded_config(text)
    assert events == [] and not marker.exists()
    assert cfg.template == "phi3_chat" and cfg.path == "./pretrained/InternVL2_5-4B"
    assert cfg.lora.r == 128 and cfg.lora.lora_alpha == 256.0 and cfg.lora.use_rslora is False
    assert cfg.values["model"]["mllm"]["llm_lora"]["type"] == Unparsed("LoraConfig")
    assert isinstance(cfg.values["model"]["evil"], Unparsed)


def test_template_from_prompt_template_source_form() -> None:
    cfg = parse_embedded_config("prompt_template = PROMPT_TEMPLATE.internlm2_chat\n")
    assert cfg.template == "internlm2_chat" and cfg.sources["template"] == "prompt_template"


def test_lora_found_by_type_when_not_named_llm_lora() -> None:
    text = textwrap.dedent("""
        model = dict(
            visual_encoder_lora=dict(type='peft.LoraConfig', r=8, lora_alpha=16),
            lora=dict(type='peft.LoraConfig', r=64, lora_alpha=16, target_modules='all-linear'))
        """)
    cfg = parse_embedded_config(text)
    assert cfg.lora.r == 64 and cfg.lora.lora_alpha == 16.0 and cfg.lora.target_modules == "all-linear"
    assert cfg.sources["lora"] == "model.lora"


def test_non_literal_settings_are_reported_not_guessed() -> None:
    cfg = parse_embedded_config("model = dict(llm_lora=dict(r=get_r(), lora_alpha=some_name, use_rslora='yes'))\n")
    assert cfg.lora.r is None and cfg.lora.lora_alpha is None and cfg.lora.use_rslora is None
    assert cfg.unresolved == {
        "r": "model.llm_lora.r = get_r()",
        "lora_alpha": "model.llm_lora.lora_alpha = some_name",
        "use_rslora": "model.llm_lora.use_rslora = 'yes'",
    }


@pytest.mark.parametrize(
    "expr, value",
    [
        ("-1", -1), ("+2.5", 2.5), ("2 * 64", 128), ("256 / 128", 2.0), ("2 ** 8", 256), ("7 // 2", 3),
        ("7 % 4", 3), ("1e-5 * 4", 4e-05), ("(1, 2)", (1, 2)), ("[1, [2, 3]]", [1, [2, 3]]),
        ("{'a': 1}", {"a": 1}), ("dict(a=dict(b=None))", {"a": {"b": None}}), ("'a' + 'b'", "ab"),
        ("not False", True), ("{1, 2}", {1, 2}), ("True", True),
    ],
)
def test_literal_evaluation(expr: str, value: object) -> None:
    assert parse_embedded_config(f"x = {expr}\n").values["x"] == value


@pytest.mark.parametrize(
    "expr",
    ["f(1)", "a.b", "x[0]", "lambda: 1", "[*a]", "dict(**a)", "{**a}", "1 if a else 2", "2 ** 10 ** 9",
     "'a' * 10 ** 12", "[0] * 10 ** 12", "1 / 0", "...", "f'{a}'", "dict(1, a=2)"],
)
def test_everything_else_is_unparsed(expr: str) -> None:
    value = parse_embedded_config(f"x = {expr}\n").values["x"]
    assert isinstance(value, Unparsed) and value.source


def test_repeated_doubling_is_bounded() -> None:
    text = "a = 'xxxxxxxx'\n" + "a = a + a\n" * 64
    assert isinstance(parse_embedded_config(text).values["a"], Unparsed)


@pytest.mark.parametrize("text", ["model = dict(\n", "x = = 1\n", "def f(:\n", "a = 'x\0'\0\n"])
def test_broken_text_sets_error(text: str) -> None:
    cfg = parse_embedded_config(text)
    assert isinstance(cfg, EmbeddedConfig) and cfg.error and cfg.lora is None and cfg.values == {}


def test_absurd_nesting_sets_error_not_crash() -> None:
    cfg = parse_embedded_config("x = " + "[" * 100_000 + "]" * 100_000 + "\n")
    assert cfg.error


def test_fixture_generator_text_parses() -> None:
    """The shared fixture generator's config text must read back to what it was given."""
    config_text = pytest.importorskip("sa2va_convert.testing.config_text")
    text = config_text.training_config_text("sa2va-qwen2_5-vl", lora_r=8, lora_alpha=32, use_rslora=True)
    cfg = parse_embedded_config(text)
    assert cfg.error is None
    assert cfg.lora.r == 8 and cfg.lora.lora_alpha == 32.0 and cfg.lora.use_rslora is True
    assert cfg.lora.modules_to_save == ["embed_tokens", "lm_head"]
    assert cfg.template == "qwen_chat" and cfg.pretrained_pth and cfg.path
