"""HFTeacher.score: rows that share a prompt run it once (models.forward) and score as the full forward does; and
the fingerprint that names a teacher and its scoring settings in the cache."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.helpers import unshared_prompts
from vlm_post.data import DataSource
from vlm_post.data.collate import Collator
from vlm_post.data.datamodule import ExampleDataset
from vlm_post.models.forward import shares_prompts
from vlm_post.rollout import ModelRows, RolloutBatch
from vlm_post.teacher import TeacherBatch
from vlm_post.teacher.scoring import HFTeacher

pytestmark = pytest.mark.fast


@pytest.fixture(scope="module")
def teacher(tiny_model, processor):
    return HFTeacher(str(tiny_model), processor, top_k=8).load("cpu")


def examples(demo_data, count: int):
    dataset = ExampleDataset(DataSource("demo_train", path=str(demo_data / "train.parquet")), 12544, 12544)
    return [dataset[i] for i in range(count)]


def full_forward_scores(teacher: HFTeacher, rows: ModelRows) -> TeacherBatch:
    return teacher.score(unshared_prompts(rows))


def test_rows_sharing_a_prompt_score_as_the_full_forward(teacher, processor, demo_data):
    first, second, third = examples(demo_data, 3)
    batch = Collator(processor)(
        [
            first,
            dataclasses.replace(second, question="<image>Which bar is longer?"),  # shorter: left-padded
            dataclasses.replace(third, images=third.images + first.images, question="<image> or <image>: which bar?"),
        ]
    )
    prompt, counts, n, length = batch["prompt"], batch["image_counts"], 3, 7
    assert not bool(prompt["attention_mask"][:, 0].all())
    lengths = torch.tensor([7, 3, 1, 7, 5, 2, 6, 7, 4])  # finished responses are right-padded
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    response = torch.randint(20, 250, (9, length), generator=torch.Generator().manual_seed(0))
    samples = RolloutBatch(prompt, counts, n, response, mask, lengths < length, [""] * 9)
    # all rows, then a micro-batch that cuts the first prompt's rows
    for rows, leaders in ([list(range(9)), [0, 3, 6]], [[2, 3, 4, 5, 6, 7, 8], [0, 1, 4]]):
        micro = samples.rows(rows)
        assert micro.leaders == leaders and shares_prompts(teacher.model, micro.inputs, micro)
        shared, full = teacher.score(micro), full_forward_scores(teacher, micro)
        assert torch.equal(shared.topk_ids, full.topk_ids)
        for key in ("topk_logprobs", "sampled_logprobs"):
            assert torch.allclose(getattr(shared, key), getattr(full, key), atol=1e-5), key


def test_text_only_prompts_are_shared_too(teacher, processor, demo_data):
    first, second = (dataclasses.replace(e, images=[]) for e in examples(demo_data, 2))
    second = dataclasses.replace(second, question="Which bar is longer, the red one?")
    batch = Collator(processor)([first, second])
    n, length = 2, 5
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [1, 0, 0, 0, 0]])
    response = torch.randint(20, 250, (4, length), generator=torch.Generator().manual_seed(1))
    rows = RolloutBatch(batch["prompt"], batch["image_counts"], n, response, mask, mask[:, -1] == 0, [""] * 4).rows()
    assert rows.leaders == [0, 2] and shares_prompts(teacher.model, rows.inputs, rows)
    shared, full = teacher.score(rows), full_forward_scores(teacher, rows)
    assert torch.equal(shared.topk_ids, full.topk_ids)
    assert torch.allclose(shared.topk_logprobs, full.topk_logprobs, atol=1e-5)


def test_rows_of_other_prompts_with_the_same_text_are_not_shared(teacher, processor, demo_data):
    batch = Collator(processor)(examples(demo_data, 4))
    assert len(set(Collator(processor).prompt_texts(batch["examples"]))) == 1
    response = torch.ones(4, 1, dtype=torch.long)
    rows = RolloutBatch(batch["prompt"], batch["image_counts"], 1, response, response, response[:, 0].bool(), []).rows()
    assert rows.leaders == [0, 1, 2, 3] and not shares_prompts(teacher.model, rows.inputs, rows)


def test_the_top_k_of_the_chunked_pass_equals_the_full_log_softmax():
    """Chunked (3 tokens a chunk), in blocks of rows: the full log-softmax's top-k and targets."""
    from vlm_post.losses.logprobs import head_scores

    torch.manual_seed(0)
    hidden, weight = torch.randn(10, 16), torch.randn(50, 16)
    targets = torch.randint(0, 50, (10,))
    sampled, _, ids, values = head_scores(hidden, weight, targets[:, None], chunk_size=3, top_k=5)
    sampled = sampled.squeeze(-1)
    full = torch.log_softmax(hidden @ weight.t(), dim=-1)
    top = full.topk(5, dim=-1)
    assert ids.dtype == torch.int32 and torch.equal(ids.long(), top.indices)
    torch.testing.assert_close(values, top.values, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sampled, full.gather(-1, targets[:, None]).squeeze(-1), rtol=1e-5, atol=1e-5)


# --- the teacher's fingerprint (vlm_post.teacher.fingerprint) ------------------------------------------------


def _fingerprint(folder, **settings):
    from vlm_post.teacher.fingerprint import fingerprint_teacher

    return fingerprint_teacher(folder, **{"top_k": 8, "cache_dtype": "float16", **settings})


def _flip_byte(path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_the_fingerprint_names_the_teacher_and_its_settings_not_its_folder(tiny_model, tmp_path):
    import json
    import shutil

    copy = shutil.copytree(tiny_model, tmp_path / "copy")
    reference = _fingerprint(tiny_model)
    assert _fingerprint(copy) == reference and _fingerprint(copy).source == str(copy)  # moved: the same teacher
    assert _fingerprint(copy, dtype="float32") == reference  # auto is the saved dtype (float32)
    for setting in ({"top_k": 16}, {"cache_dtype": "bfloat16"}, {"dtype": "bfloat16"}):
        assert _fingerprint(copy, **setting) != reference, setting
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "transformers_version": "0.0", "_name_or_path": "x"}))
    assert _fingerprint(copy) == reference, "a re-save's bookkeeping is not the teacher"
    (copy / "config.json").write_text(json.dumps({**config, "rope_theta": 1.0}))
    assert _fingerprint(copy).differences(reference) == ["config"]
    (copy / "config.json").write_text(json.dumps(config))
    (copy / "tokenizer_config.json").write_text(
        (copy / "tokenizer_config.json").read_text().replace("}", ', "x": 1}', 1)
    )
    assert _fingerprint(copy).differences(reference) == ["tokenizer"]
    shutil.copy(tiny_model / "tokenizer_config.json", copy)
    _flip_byte(copy / "model.safetensors", (copy / "model.safetensors").stat().st_size // 2)  # small: hashed whole
    assert _fingerprint(copy).differences(reference) == ["weights"]
    (copy / "model.safetensors").unlink()
    from vlm_post.errors import ConfigError

    with pytest.raises(ConfigError, match=r"copy has no weight files \(\*.safetensors, \*.bin\) to fingerprint"):
        _fingerprint(copy)


def test_the_teacher_fingerprints_itself_as_the_module_does(teacher, tiny_model):
    assert teacher.fingerprint("float16") == _fingerprint(tiny_model)
    assert teacher.fingerprint("float16").settings["dtype"] == "float32"


def _write_large_safetensors(folder, monkeypatch):
    """A weight file past FULL_HASH_BYTES (lowered for the test): a 1 MiB matrix and a small norm."""
    from safetensors.torch import save_file

    from vlm_post.teacher import fingerprint

    monkeypatch.setattr(fingerprint, "FULL_HASH_BYTES", 1 << 16)
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "made_up"}')
    path = folder / "model.safetensors"
    save_file({"layer.weight": torch.randn(512, 512), "norm.weight": torch.ones(16)}, str(path))
    header = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    return path, header  # layer.weight comes first: its bytes start at ``header``


def test_a_large_weight_file_is_fingerprinted_by_its_header_and_samples_of_every_tensor(tmp_path, monkeypatch):
    from vlm_post.teacher.fingerprint import SAMPLE_BYTES

    path, start = _write_large_safetensors(tmp_path / "t", monkeypatch)
    original, reference = path.read_bytes(), _fingerprint(tmp_path / "t")
    matrix_bytes = 512 * 512 * 4
    changed = {
        "the matrix's first bytes": start + 10,
        "the matrix's last bytes": start + matrix_bytes - 10,
        "a sampled place inside it": start + (matrix_bytes - SAMPLE_BYTES) // 3 + 5,
        "the small tensor (read whole)": start + matrix_bytes + 7,
    }
    for where, offset in changed.items():
        _flip_byte(path, offset)
        assert _fingerprint(tmp_path / "t") != reference, where
        path.write_bytes(original)
    path.write_bytes(original.replace(b"norm.weight", b"norm.weighs", 1))  # the header (names, shapes, dtypes)
    assert _fingerprint(tmp_path / "t") != reference
    path.write_bytes(original)
    # What it misses, as its docstring says: a change between the sampled places of a large tensor.
    _flip_byte(path, start + matrix_bytes // 6)
    assert _fingerprint(tmp_path / "t") == reference


def test_fingerprinting_a_large_teacher_reads_only_samples(tmp_path):
    """A 16 GiB sparse safetensors file of 128 tensors (the layout of a large teacher's shard) in well under a
    second: the header and 4 x 4 KiB of each tensor, not the 16 GiB."""
    import json
    import struct
    import time

    folder = tmp_path / "big"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "made_up"}')
    size = 128 << 20  # bytes per tensor
    tensor = {"dtype": "BF16", "shape": [8192, size // 16384]}
    header = json.dumps(
        {f"layers.{i}.weight": {**tensor, "data_offsets": [i * size, (i + 1) * size]} for i in range(128)}
    )
    path = folder / "model-00001-of-00001.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header.encode())
        f.truncate(8 + len(header) + 128 * size)
    started = time.perf_counter()
    reference = _fingerprint(folder)
    assert time.perf_counter() - started < 2.0
    with open(path, "r+b") as f:  # a trained teacher: every tensor's bytes differ
        f.seek(8 + len(header) + 5 * size)
        f.write(b"\x01" * 8)
    assert _fingerprint(folder).differences(reference) == ["weights"]


def test_a_large_weight_file_of_another_format_is_sampled_evenly(tmp_path, monkeypatch):
    from vlm_post.teacher import fingerprint

    monkeypatch.setattr(fingerprint, "FULL_HASH_BYTES", 1 << 16)
    (tmp_path / "config.json").write_text('{"model_type": "made_up"}')
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(bytes(1 << 20))
    reference = _fingerprint(tmp_path)
    _flip_byte(path, (1 << 20) - 1)  # the file's last bytes are sampled
    assert _fingerprint(tmp_path) != reference


# --- where the scores live: TeacherScoreSource --------------------------------------------------------------------


def sampled(processor, policy_path) -> tuple[RolloutBatch, list]:
    from tests.test_rollout import _batch
    from vlm_post.models.loading import load_policy
    from vlm_post.rollout import HFGenerateEngine, SamplingParams

    batch = _batch(processor)
    torch.manual_seed(0)
    policy = load_policy(str(policy_path))
    return HFGenerateEngine(processor).sample(policy, batch, SamplingParams(n=2, max_new_tokens=5)), batch["examples"]


def test_an_in_process_teacher_without_a_cache_keeps_its_fp32_scores_and_with_one_rounds_as_the_cache(
    teacher, tiny_model, processor, tmp_path
):
    """No cache: the step gets the teacher's own fp32 numbers. A cache: the numbers a run reading the cache back
    gets, bit for bit (rounded to the cache dtype where they were computed)."""
    from vlm_post.modules.distill import TeacherConfig
    from vlm_post.teacher import TeacherScoreSource

    samples, examples = sampled(processor, tiny_model)
    own = teacher.score(samples.rows())
    assert own.topk_logprobs.dtype == torch.float32

    plain = TeacherScoreSource(TeacherConfig(model_name_or_path=str(tiny_model), top_k=8))
    plain.open(teacher, "rank0")
    got = plain.scores(samples, examples, micro_batch_size=samples.num_rows, name="step0")
    for field in ("topk_ids", "topk_logprobs", "sampled_logprobs", "mask"):
        assert torch.equal(getattr(got, field), getattr(own, field)), field

    config = TeacherConfig(model_name_or_path=str(tiny_model), cache_dir=str(tmp_path / "cache"), top_k=8)
    scoring, reading = TeacherScoreSource(config), TeacherScoreSource(config)
    scoring.open(teacher, "rank0")
    scored = scoring.scores(samples, examples, micro_batch_size=3, name="step0")  # passes of 3 rows: 2 images
    scoring.close()
    reading.open(teacher, "rank0")
    read = reading.scores(samples, examples, micro_batch_size=3, name="step0")
    reading.close()
    assert (scoring.scored_rows, reading.scored_rows) == (samples.num_rows, 0)  # the second run read the cache
    assert scored.topk_logprobs.dtype == read.topk_logprobs.dtype == torch.float16
    for field in ("topk_ids", "topk_logprobs", "sampled_logprobs", "mask"):
        assert torch.equal(getattr(scored, field), getattr(read, field)), field
    torch.testing.assert_close(scored.topk_logprobs.float(), own.topk_logprobs, rtol=1e-3, atol=1e-3)
