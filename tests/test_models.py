"""Policy loading, freezing, export, and the offline tiny models (Qwen2.5-VL and Qwen2-VL)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from tests.helpers import demo_datamodule, sft_module, trainer
from vlm_post.errors import ConfigError
from vlm_post.models import export_hf, load_policy, resolve_model_path
from vlm_post.models.loading import vision_parts
from vlm_post.models.tiny import build_tiny_qwen2_5_vl


def test_tiny_model_is_a_real_qwen2_5_vl(tiny_model):
    config = json.loads((tiny_model / "config.json").read_text())
    assert config["model_type"] == "qwen2_5_vl"
    assert config["text_config"]["rope_parameters"]["mrope_section"] == [4, 6, 6]
    model = AutoModelForImageTextToText.from_pretrained(tiny_model)
    assert 0.4e6 < sum(p.numel() for p in model.parameters()) < 1.5e6
    processor = AutoProcessor.from_pretrained(tiny_model)
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"
    assert 400 <= len(processor.tokenizer) <= 520
    for token in ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"):
        assert len(processor.tokenizer.tokenize(token)) == 1, token


def test_tiny_model_is_deterministic(tiny_model, tmp_path):
    again = build_tiny_qwen2_5_vl(tmp_path / "again")
    assert (again / "model.safetensors").read_bytes() == (tiny_model / "model.safetensors").read_bytes()
    assert (again / "tokenizer.json").read_text() == (tiny_model / "tokenizer.json").read_text()


def test_load_policy_returns_train_mode(tiny_model):
    model = load_policy(str(tiny_model), dtype="bfloat16")
    assert model.training and next(model.parameters()).dtype == torch.bfloat16


def test_resolve_model_path(tiny_model, tmp_path):
    assert resolve_model_path(str(tiny_model)) == str(tiny_model)
    with pytest.raises(ConfigError, match="no config.json"):
        resolve_model_path(str(tmp_path))
    with pytest.raises(ConfigError, match="offline"):
        resolve_model_path("Qwen/Qwen2.5-VL-7B-Instruct-not-cached")


def test_freeze_options(tiny_model):
    module = sft_module(tiny_model, freeze_vision_tower=True, freeze_projector=False)
    module.configure_model()
    vision, projector = vision_parts(module.policy)
    projector_ids = {id(p) for p in projector.parameters()}
    assert all(not p.requires_grad for p in vision.parameters() if id(p) not in projector_ids)
    assert all(p.requires_grad for p in projector.parameters())
    both = sft_module(tiny_model, freeze_vision_tower=True, freeze_projector=True)
    both.configure_model()
    assert not any(p.requires_grad for p in vision_parts(both.policy)[0].parameters())
    assert any(p.requires_grad for p in both.policy.lm_head.parameters())


def test_gradient_checkpointing_trains(tiny_model, demo_data, tmp_path):
    module = sft_module(tiny_model, gradient_checkpointing=True)
    trainer(tmp_path, max_steps=2).fit(module, demo_datamodule(demo_data, batch_size=4))
    flag = getattr(module.policy, "is_activation_checkpointing", None)
    assert flag if flag is not None else module.policy.is_gradient_checkpointing


def test_export_round_trip(tiny_model, tmp_path):
    model = load_policy(str(tiny_model))
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    out = export_hf(model, AutoProcessor.from_pretrained(tiny_model), tmp_path / "export")
    reloaded = AutoModelForImageTextToText.from_pretrained(out)
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".export")], "temporary export folder left behind"


def test_qwen2_vl_trains_too(tmp_path, demo_data):
    path = build_tiny_qwen2_5_vl(tmp_path / "tiny-qwen2-vl", arch="qwen2_vl")
    module = sft_module(path)
    trainer(tmp_path, max_steps=2).fit(module, demo_datamodule(demo_data, batch_size=4))
    assert type(module.policy).__name__ == "Qwen2VLForConditionalGeneration"


def test_init_from_other_architecture_is_refused(tiny_model, tmp_path):
    other = build_tiny_qwen2_5_vl(tmp_path / "wide", hidden_size=64)
    with pytest.raises(ConfigError, match="init_from"):
        sft_module(tiny_model, init_from=str(other))
