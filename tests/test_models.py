"""Policy loading, freezing, export, and the offline tiny models (Qwen2.5-VL and Qwen2-VL)."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from tests.helpers import demo_datamodule, sft_module, trainer
from vlm_post.errors import ConfigError, RunStopped
from vlm_post.models import export_hf, load_policy, resolve_model_path
from vlm_post.models.export import MANIFEST, PROVENANCE, verify_hf_folder
from vlm_post.models.loading import vision_parts
from vlm_post.models.tiny import build_tiny_qwen2_5_vl


@pytest.mark.fast
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


@pytest.mark.fast
def test_tiny_model_is_deterministic(tiny_model, tmp_path):
    again = build_tiny_qwen2_5_vl(tmp_path / "again")
    assert (again / "model.safetensors").read_bytes() == (tiny_model / "model.safetensors").read_bytes()
    assert (again / "tokenizer.json").read_text() == (tiny_model / "tokenizer.json").read_text()


@pytest.mark.fast
def test_load_policy_returns_train_mode(tiny_model):
    model = load_policy(str(tiny_model), dtype="bfloat16")
    assert model.training and next(model.parameters()).dtype == torch.bfloat16


@pytest.mark.fast
def test_the_patch_embedding_runs_as_a_matmul_with_the_convolutions_values_gradients_and_weights(tiny_model):
    """load_policy computes the vision tower's non-overlapping Conv3d as flattened patches @ flattened kernel:
    the convolution's values and gradients up to float rounding, its parameters, names and shapes unchanged."""
    from vlm_post.models.loading import PatchifyConv3d, patch_embeddings_as_matmul

    model = load_policy(str(tiny_model))
    proj = model.model.visual.patch_embed.proj
    assert type(proj) is PatchifyConv3d and isinstance(proj, torch.nn.Conv3d)
    plain = AutoModelForImageTextToText.from_pretrained(str(tiny_model))
    assert type(plain.model.visual.patch_embed.proj) is torch.nn.Conv3d
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
    patches = torch.randn(300, proj.in_channels, *proj.kernel_size, requires_grad=True)
    conv = torch.nn.functional.conv3d(patches, proj.weight, proj.bias, proj.stride)
    matmul = proj(patches)
    assert matmul.shape == conv.shape
    torch.testing.assert_close(matmul, conv, rtol=1e-5, atol=1e-5)
    for got, want in zip(torch.autograd.grad(matmul.square().sum(), (patches, proj.weight)),
                         torch.autograd.grad(conv.square().sum(), (patches, proj.weight))):  # fmt: skip
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    wider = torch.randn(2, proj.in_channels, proj.kernel_size[0], 2 * proj.kernel_size[1], proj.kernel_size[2])
    assert proj(wider).shape == (2, proj.out_channels, 1, 2, 1)  # more than one patch per row: a real convolution
    overlapping = torch.nn.Conv3d(3, 4, kernel_size=3, stride=1)
    holder = torch.nn.Sequential(overlapping)
    patch_embeddings_as_matmul(holder)
    assert type(holder[0]) is torch.nn.Conv3d  # a sliding kernel stays a convolution


@pytest.mark.fast
def test_resolve_model_path(tiny_model, tmp_path):
    assert resolve_model_path(str(tiny_model)) == str(tiny_model)
    with pytest.raises(ConfigError, match="no config.json"):
        resolve_model_path(str(tmp_path))
    with pytest.raises(ConfigError, match="offline"):
        resolve_model_path("Qwen/Qwen2.5-VL-7B-Instruct-not-cached")


@pytest.mark.fast
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


@pytest.mark.slow
def test_gradient_checkpointing_trains(tiny_model, demo_data, tmp_path):
    module = sft_module(tiny_model, gradient_checkpointing=True)
    trainer(tmp_path, max_steps=2).fit(module, demo_datamodule(demo_data, batch_size=4))
    flag = getattr(module.policy, "is_activation_checkpointing", None)
    assert flag if flag is not None else module.policy.is_gradient_checkpointing


@pytest.mark.fast
def test_export_round_trip(tiny_model, tmp_path):
    model = load_policy(str(tiny_model))
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    out = export_hf(model, AutoProcessor.from_pretrained(tiny_model), tmp_path / "export")
    reloaded = AutoModelForImageTextToText.from_pretrained(out)
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".export")], "temporary export folder left behind"


@pytest.mark.fast
def test_an_export_is_a_verified_version_behind_a_symlink(tiny_model, tmp_path):
    """``export -> export.<n>``; each new export is the next version, and the one it replaced is gone."""
    model, processor = load_policy(str(tiny_model)), AutoProcessor.from_pretrained(tiny_model)
    out = export_hf(model, processor, tmp_path / "export", provenance={"weights": "best.ckpt"})
    assert os.readlink(out) == "export.1"  # relative: the run folder moves whole
    manifest = json.loads((out / MANIFEST).read_text())
    files = {p.name for p in (tmp_path / "export.1").iterdir()} - {MANIFEST}
    assert set(manifest["files"]) == files and {"model.safetensors", "config.json", PROVENANCE} <= files
    assert manifest["files"]["model.safetensors"]["size"] == (out / "model.safetensors").stat().st_size
    assert json.loads((out / PROVENANCE).read_text()) == {"weights": "best.ckpt", "manifest": MANIFEST}
    assert verify_hf_folder(out) == "sha256"
    export_hf(model, processor, out)
    assert os.readlink(out) == "export.2" and sorted(p.name for p in tmp_path.iterdir()) == ["export", "export.2"]


@pytest.mark.fast
def test_a_nonfinite_weight_is_never_exported(tiny_model, tmp_path):
    model, processor = load_policy(str(tiny_model)), AutoProcessor.from_pretrained(tiny_model)
    out = export_hf(model, processor, tmp_path / "export")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("inf")
        model.model.language_model.norm.weight[0] = float("nan")
    with pytest.raises(RunStopped, match=r"2 of \d+ weight tensors are non-finite \(first: [\w.]+\);") as error:
        export_hf(model, processor, out)
    assert f"the export already in {out} is as it was" in str(error.value)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "export.1"]
    with pytest.raises(RunStopped, match=f"nothing was written to {tmp_path / 'fresh'}"):
        export_hf(model, processor, tmp_path / "fresh")


@pytest.mark.fast
@pytest.mark.parametrize("exchange", ["renameat2", "two renames"])
def test_an_export_from_before_versions_is_replaced(tiny_model, tmp_path, monkeypatch, exchange):
    """A real folder at the export path (exports were written so until now) is swapped for the symlink: by
    ``renameat2(RENAME_EXCHANGE)`` where there is one, else by two renames."""
    import vlm_post.models.export as export_module

    if exchange == "two renames":
        monkeypatch.setattr(export_module.ctypes, "CDLL", lambda *a, **k: object())  # a libc without renameat2
    model, processor = load_policy(str(tiny_model)), AutoProcessor.from_pretrained(tiny_model)
    legacy = tmp_path / "export"
    model.save_pretrained(legacy)
    export_hf(model, processor, legacy)
    assert os.readlink(legacy) == "export.1" and verify_hf_folder(legacy) == "sha256"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "export.1"]


def _broken_copy(tiny_model, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    return folder, folder / "model.safetensors"


@pytest.mark.fast
def test_a_folder_without_manifest_is_checked_by_its_safetensors_headers(tiny_model, tmp_path):
    folder, weights = _broken_copy(tiny_model, tmp_path)
    assert verify_hf_folder(folder) == "structure"
    data = bytearray(weights.read_bytes())
    data[-4096:] = bytes(b ^ 0xFF for b in data[-4096:])
    weights.write_bytes(bytes(data))
    assert verify_hf_folder(folder) == "structure", "bytes changed inside a tensor cannot be seen without a manifest"
    with open(weights, "ab") as file:
        file.write(b"\0" * 10)
    with pytest.raises(ConfigError, match=f"{weights} is \\d+ bytes but its header says \\d+ \\(trailing bytes\\)"):
        verify_hf_folder(folder)
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [n + 1 for n in header[name]["shape"]]
    raw = json.dumps(header).encode().ljust(length)[:length]
    weights.write_bytes(bytes(data[:8]) + raw + bytes(data[8 + length :]))
    with pytest.raises(ConfigError, match=f"{weights} has a garbled safetensors header"):
        verify_hf_folder(folder)


@pytest.mark.fast
def test_sharded_weights_are_checked_through_their_index(tiny_model, tmp_path):
    folder, weights = _broken_copy(tiny_model, tmp_path)
    weights.rename(folder / "model-00001-of-00001.safetensors")
    weight_map = {"a": "model-00001-of-00001.safetensors", "b": "model-00002-of-00002.safetensors"}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ConfigError, match=f"{folder / 'model-00002-of-00002.safetensors'} is missing"):
        verify_hf_folder(folder)


@pytest.mark.fast
def test_an_export_is_hashed_once_per_process_and_unlisted_weights_are_refused(tiny_model, tmp_path, monkeypatch):
    import vlm_post.models.export as export_module

    out = export_hf(load_policy(str(tiny_model)), AutoProcessor.from_pretrained(tiny_model), tmp_path / "export")
    hashed = []
    real = export_module.sha256_of
    monkeypatch.setattr(export_module, "sha256_of", lambda path: hashed.append(path) or real(path))
    verify_hf_folder(out)
    verify_hf_folder(out)  # init_from checks it, then load_policy does: one hash
    assert len(hashed) == len(json.loads((out / MANIFEST).read_text())["files"])
    (out / "pytorch_model.bin").write_bytes(b"weights the export did not write")
    with pytest.raises(ConfigError, match=f"{out / 'pytorch_model.bin'} is not in the export's {MANIFEST}"):
        verify_hf_folder(out, "model.init_from")


@pytest.mark.fast
def test_a_truncated_hub_model_in_the_cache_is_one_line(tiny_model, tmp_path, monkeypatch):
    """A hub id whose cached snapshot is broken (an interrupted copy of the cache): named, not a traceback."""
    import huggingface_hub.constants

    repo = tmp_path / "hub" / "models--someone--tiny-vl"
    snapshot = repo / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_model, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    os.truncate(snapshot / "model.safetensors", 1000)
    cached = re.escape(f"someone/tiny-vl (Hugging Face cache): {snapshot / 'model.safetensors'} is")
    with pytest.raises(ConfigError, match=cached):
        load_policy("someone/tiny-vl")


@pytest.mark.slow
def test_qwen2_vl_trains_too(tmp_path, demo_data):
    path = build_tiny_qwen2_5_vl(tmp_path / "tiny-qwen2-vl", arch="qwen2_vl")
    module = sft_module(path)
    trainer(tmp_path, max_steps=2).fit(module, demo_datamodule(demo_data, batch_size=4))
    assert type(module.policy).__name__ == "Qwen2VLForConditionalGeneration"


@pytest.mark.fast
def test_init_from_other_architecture_is_refused(tiny_model, tmp_path):
    other = build_tiny_qwen2_5_vl(tmp_path / "wide", hidden_size=64)
    with pytest.raises(ConfigError, match="init_from"):
        sft_module(tiny_model, init_from=str(other))


@pytest.mark.fast
def test_a_version_the_user_linked_to_is_kept(tiny_model, tmp_path):
    model, processor = load_policy(str(tiny_model)), AutoProcessor.from_pretrained(tiny_model)
    out = export_hf(model, processor, tmp_path / "export")
    (tmp_path / "first").symlink_to("export.1")
    export_hf(model, processor, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "export.1", "export.2", "first"]
    assert verify_hf_folder(tmp_path / "first") == "sha256"
