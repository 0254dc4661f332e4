"""The data module on real Geometry3K/MathVista rows and on deliberately broken rows."""

from __future__ import annotations

import io

import datasets
import pytest
import torch
from PIL import Image

from tests.conftest import GEO3K_SAMPLE, MATHVISTA_TESTMINI, needs_shared
from vlm_post.data import DataSource, VLMDataModule
from vlm_post.data.collate import IGNORE_INDEX, Collator
from vlm_post.data.prompting import DEFAULT_INSTRUCTION, build_messages
from vlm_post.data.schema import Example
from vlm_post.errors import ConfigError

pytestmark = pytest.mark.fast


def _datamodule(processor, **kwargs) -> VLMDataModule:
    kwargs.setdefault("min_pixels", 3136)
    kwargs.setdefault("max_pixels", 12544)
    dm = VLMDataModule(**kwargs)
    dm.processor = processor
    return dm


@needs_shared
def test_geometry3k_sample_normalised(processor):
    dm = _datamodule(processor, val=[DataSource("geo3k", path=str(GEO3K_SAMPLE))])
    dm.setup("validate")
    dataset = dm.datasets["geo3k"]
    assert len(dataset) == 10 and dm.skipped == {"geo3k": 0}
    example = dataset[4]
    assert example.id == "15" and example.answer == "5\\sqrt{3}"
    assert example.choices == ["5", "5\\sqrt{2}", "5\\sqrt{3}", "10"]
    assert example.extra["ground_truth"] == "C" and example.source == "geo3k"
    assert all(im.mode == "RGB" and 3136 <= im.width * im.height <= 12544 for e in dataset for im in e.images)
    batch = next(iter(dm.val_dataloader()[0]))
    prompt = batch["prompt"]
    for key in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids"):
        assert key in prompt, key
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    expected = int((prompt["image_grid_thw"].prod(-1) // 4).sum())
    assert int((prompt["input_ids"] == image_id).sum()) == expected
    assert torch.equal(prompt["mm_token_type_ids"].bool(), prompt["input_ids"] == image_id)
    assert (prompt["attention_mask"][:, -1] == 1).all(), "prompts must be left-padded for generation"


@needs_shared
def test_mathvista_testmini_without_images_is_counted_not_crashed():
    # testmini.json carries questions and answers but no images: every row is bad, and we say so.
    dm = VLMDataModule(test=[DataSource("mathvista", kind="mathvista", path=str(MATHVISTA_TESTMINI))])
    with (
        pytest.warns(UserWarning, match="skipped 1000 of 1000 rows"),
        pytest.raises(ConfigError, match=r"'mathvista'.*no usable rows.*missing image file"),
    ):
        dm._dataset(dm.test_sources[0])


@needs_shared
def test_mathvista_rows_normalised(tmp_path):
    import json

    rows = list(json.loads(MATHVISTA_TESTMINI.read_text()).values())[:40]
    for row in rows:
        row["image"] = "img.png"
    Image.new("RGB", (64, 48), "white").save(tmp_path / "img.png")
    (tmp_path / "testmini.json").write_text(json.dumps(rows))
    dm = VLMDataModule(test=[DataSource("mathvista", kind="mathvista", path=str(tmp_path / "testmini.json"))])
    dataset = dm._dataset(dm.test_sources[0])
    assert len(dataset) == 40
    by_id = {e.id: e for e in dataset}
    multi = next(r for r in rows if r["question_type"] == "multi_choice")
    example = by_id[multi["pid"]]
    assert example.choices == multi["choices"] and "(A) " in example.question
    floats = [r for r in rows if r["answer_type"] == "float"]
    assert floats and by_id[floats[0]["pid"]].precision == int(floats[0]["precision"])


def _bad_rows_parquet(path):
    good = io.BytesIO()
    Image.new("RGB", (60, 40), "red").save(good, format="PNG")
    rows = [
        {"images": [{"bytes": good.getvalue(), "path": None}], "problem": "<image>Find x.", "answer": "3", "id": 1},
        {"images": [{"bytes": b"not a png", "path": None}], "problem": "<image>Find y.", "answer": "4", "id": 2},
        {"images": [], "problem": "<image>Find z.", "answer": "5", "id": 3},
        {"images": [{"bytes": good.getvalue(), "path": None}], "problem": "  ", "answer": "6", "id": 4},
        {"images": [{"bytes": good.getvalue(), "path": None}], "problem": "<image>Find w.", "answer": "", "id": 5},
    ]
    features = datasets.Features(
        {
            "images": datasets.List(datasets.Image()),
            "problem": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "id": datasets.Value("int64"),
        }
    )
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(path))
    return path


def test_bad_rows_reported_skipped_counted(tmp_path, processor):
    path = _bad_rows_parquet(tmp_path / "bad.parquet")
    dm = _datamodule(processor, val=[DataSource("mixed", path=str(path))])
    with pytest.warns(UserWarning) as warnings:
        dm.setup("validate")
    dataset = dm.datasets["mixed"]
    assert [e.id for e in dataset] == ["1"]
    assert dm.skipped == {"mixed": 4}
    reasons = dict(dataset.skipped)
    assert "corrupt" in reasons["id=2"] and "missing image" in reasons["id=3"]
    assert "empty question" in reasons["id=4"] and "empty answer" in reasons["id=5"]
    messages = " ".join(str(w.message) for w in warnings)
    assert "id=2" in messages and "skipped 4 of 5 rows" in messages


def test_bad_rows_fail_fast(tmp_path, processor):
    path = _bad_rows_parquet(tmp_path / "bad.parquet")
    dm = _datamodule(processor, val=[DataSource("mixed", path=str(path))], fail_fast=True)
    with pytest.raises(ConfigError, match=r"'mixed'.*id=2.*corrupt"):
        dm.setup("validate")


def test_missing_data_file_fails_at_construction():
    with pytest.raises(ConfigError, match=r"'train'.*not found.*nowhere.parquet"):
        VLMDataModule(train=DataSource("train", path="data/nowhere.parquet"))


def test_hub_source_offline_names_the_source():
    dm = VLMDataModule(val=[DataSource("geo3k_val", path="hiyouga/geometry3k", split="validation")])
    with pytest.raises(ConfigError, match=r"'geo3k_val'.*hiyouga/geometry3k.*validation"):
        dm._dataset(dm.val_sources[0])


def test_images_follow_markers():
    image = Image.new("RGB", (28, 28))
    example = Example(id="1", images=[image], question="<image>Find y.", answer="3", source="s")
    content = build_messages(example, "Box it.")[0]["content"]
    assert [p["type"] for p in content] == ["image", "text", "text"]
    assert content[1]["text"] == "Find y." and content[2]["text"].strip() == "Box it."
    two = Example(id="2", images=[image, image], question="Compare <image> with", answer="a", source="s")
    types = [p["type"] for p in build_messages(two, "")[0]["content"]]
    assert types.count("image") == 2 and types[:2] == ["image", "image"]


def test_sft_labels_cover_the_answer_only(processor):
    image = Image.new("RGB", (112, 112), "white")
    examples = [
        Example(id="1", images=[image], question="<image>Which bar?", answer="red", source="s"),
        Example(id="2", images=[image], question="<image>Which bar is longer, red or blue?", answer="blue", source="s"),
    ]
    batch = Collator(processor, with_prompt=True, with_sft=True)(examples)
    sft = batch["sft"]
    for key in batch["prompt"]:
        assert key in sft, f"processor output {key} dropped from the SFT batch"
    tokenizer = processor.tokenizer
    for row, example in enumerate(examples):
        target = sft["labels"][row][sft["labels"][row] != IGNORE_INDEX]
        assert tokenizer.decode(target) == f"<think></think>\\boxed{{{example.answer}}}<|im_end|>"
        length = int(sft["attention_mask"][row].sum())
        assert (sft["attention_mask"][row][:length] == 1).all(), "SFT rows are right-padded"
        # mrope needs the image positions marked, and nothing after the prompt marked as image.
        image_positions = sft["input_ids"][row] == tokenizer.convert_tokens_to_ids("<|image_pad|>")
        assert torch.equal(sft["mm_token_type_ids"][row].bool(), image_positions)
    assert torch.equal(sft["pixel_values"], batch["prompt"]["pixel_values"])


def test_sft_target_column(processor):
    image = Image.new("RGB", (56, 56))
    example = Example(
        id="1", images=[image], question="Q", answer="3", source="s", extra={"solution": "<think>1+2</think>\\boxed{3}"}
    )
    sft = Collator(processor, with_prompt=False, with_sft=True, target_column="solution")([example])["sft"]
    target = sft["labels"][0][sft["labels"][0] != IGNORE_INDEX]
    assert processor.tokenizer.decode(target) == "<think>1+2</think>\\boxed{3}<|im_end|>"


def test_samplers_split_the_single_process_order_over_ranks():
    from vlm_post.data.sampler import EvalShardSampler, ResumableRandomSampler

    single = list(ResumableRandomSampler(10, seed=3))
    ranks = [list(ResumableRandomSampler(10, seed=3, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 5
    for step in range(0, 4, 2):  # per-rank batches of 2: both ranks together take the single process's batch of 4
        assert sorted(ranks[0][step : step + 2] + ranks[1][step : step + 2]) == sorted(single[2 * step : 2 * step + 4])
    resumed = ResumableRandomSampler(10, seed=3, num_replicas=2, rank=1)
    resumed.resume_at(0, 4)  # 4 examples (over both ranks) were trained on
    assert list(resumed) == ranks[1][2:]
    # Evaluation: every problem exactly once, equal lengths, the one filler past the end of the data set.
    shards = [list(EvalShardSampler(5, num_replicas=2, rank=r)) for r in (0, 1)]
    assert shards == [[0, 2, 4], [1, 3, 5]]


def test_an_eval_filler_is_a_marked_copy_that_no_metric_counts(demo_data):
    from vlm_post.data.datamodule import ExampleDataset
    from vlm_post.data.sources import DataSource
    from vlm_post.modules.evaluation import BatchEvaluation

    dataset = ExampleDataset(DataSource("demo_val", path=str(demo_data / "validation.parquet"), limit=5), 12544, 12544)
    filler = dataset[len(dataset) + 1]
    assert filler.is_padding and filler.id == dataset[1].id and not dataset[1].is_padding
    # Two problems x 2 samples; keeping problem 1 keeps its greedy answer, its samples and their token rows.
    result = BatchEvaluation(
        ["a", "b"], [(True, "1"), (False, None)], torch.tensor([3, 4]),
        [["x", "y"], ["z", "w"]], [[(True, "1"), (True, "1")], [(False, "2"), (False, None)]],
        torch.tensor([[1, 2], [3, 4]]), torch.arange(8.0).view(4, 2), torch.ones(4, 2),
    )  # fmt: skip
    kept = result.select([1])
    assert kept.greedy_texts == ["b"] and kept.sample_texts == [["z", "w"]]
    assert kept.sample_lengths.tolist() == [[3, 4]] and kept.token_entropy.tolist() == [[4.0, 5.0], [6.0, 7.0]]


# --- rows that cannot be loaded, and prompts too long: bad rows named by file and line, or by id ------------------


def _write(path, content: bytes):
    path.write_bytes(content)
    return path


def test_json_lines_that_are_not_rows_are_bad_rows_by_line(tmp_path):
    from vlm_post.data.sources import load_rows

    data = _write(
        tmp_path / "rows.jsonl",
        b'\xef\xbb\xbf{"id": 1, "problem": "a"}\n'  # a byte-order mark opens the file: not a fault
        b'{"id": 2, "problem": "caf\xe9"}\n'
        b'{"id": 3, "problem": \n'
        b"42\n"
        b"\n"
        b"   \r\n"
        b'{"id": 7, "problem": "b", "solution": "c"}\r\n',  # a key the first row lacks: null there
    )
    loaded = load_rows(DataSource("s", path=str(data)))
    assert loaded.unreadable == [
        (f"{data} line 2", "not valid UTF-8: byte 0xe9 at column 26"),
        (f"{data} line 3", "not valid JSON: Expecting value at column 22"),
        (f"{data} line 4", "a JSON number, not an object"),
        (f"{data} line 5", "empty line"),
        (f"{data} line 6", "empty line"),
    ]
    assert loaded.rows.to_list() == [
        {"id": 1, "problem": "a", "solution": None},
        {"id": 7, "problem": "b", "solution": "c"},
    ]


def test_limit_counts_unreadable_lines_and_reads_no_further(tmp_path):
    from vlm_post.data.sources import load_rows

    data = _write(tmp_path / "rows.jsonl", b'{"id": 1}\n[]\n{"id": 3}\n{"id": 4}\nnot read\n')
    loaded = load_rows(DataSource("s", path=str(data), limit=3))
    assert loaded.rows["id"] == [1, 3] and loaded.unreadable == [(f"{data} line 2", "a JSON array, not an object")]


def test_json_documents_arrays_keyed_objects_and_json_lines_in_a_json_file(tmp_path):
    from vlm_post.data.sources import load_rows

    array = _write(tmp_path / "array.json", b'[{"id": 1}, "two", {"id": 3}]')
    loaded = load_rows(DataSource("s", path=str(array)))
    assert loaded.rows["id"] == [1, 3] and loaded.unreadable == [(f"{array} item 2", "a JSON string, not an object")]
    keyed = _write(tmp_path / "keyed.json", b'{"a": {"pid": "a"}, "b": {"pid": "b"}}')  # MathVista's testmini.json
    assert load_rows(DataSource("s", path=str(keyed))).rows["pid"] == ["a", "b"]
    lines = _write(tmp_path / "lines.json", b'{"id": 1}\n{"id": 2\n{"id": 3}\n')  # JSON Lines, named .json
    loaded = load_rows(DataSource("s", path=str(lines)))
    assert loaded.rows["id"] == [1, 3] and [where for where, _ in loaded.unreadable] == [f"{lines} line 2"]
    scalar = _write(tmp_path / "scalar.json", b"3")
    with pytest.raises(
        ConfigError, match=r"'s'.*scalar.json: a JSON number, not an array of rows or an object of rows"
    ):
        load_rows(DataSource("s", path=str(scalar)))


def test_a_column_of_mixed_types_is_one_error_naming_the_column(tmp_path):
    from vlm_post.data.sources import load_rows

    data = _write(tmp_path / "rows.jsonl", b'{"id": 1, "answer": "3"}\n{"id": 2, "answer": [3]}\n')
    with pytest.raises(
        ConfigError, match=r"data source 's': .*rows.jsonl: column 'answer' holds values of different types"
    ):
        load_rows(DataSource("s", path=str(data)))


def test_a_row_arrow_cannot_decode_is_a_bad_row(tmp_path, processor):
    """datasets reads a parquet string column without checking its UTF-8; the row fails only when it is read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = _bad_rows_parquet(tmp_path / "good.parquet")
    table = pq.read_table(path).slice(0, 1)
    broken = pa.array([b"<image>Find \xff."], pa.binary()).view(pa.string())  # skips pyarrow's UTF-8 check
    pq.write_table(pa.concat_tables([table, table.set_column(1, "problem", broken)]), tmp_path / "mixed.parquet")
    dm = _datamodule(processor, val=[DataSource("mixed", path=str(tmp_path / "mixed.parquet"))])
    with pytest.warns(
        UserWarning, match=r"skipped row at index 1 of .*mixed.parquet: unreadable row \(UnicodeDecodeError"
    ):
        dm.setup("validate")
    assert dm.skipped == {"mixed": 1} and len(dm.datasets["mixed"]) == 1


@pytest.mark.parametrize("sizes", [[], [(112, 112)], [(300, 77), (28, 900)], [(1000, 1000)]])
def test_prompt_token_count_is_what_the_collator_encodes(processor, sizes):
    from vlm_post.data.collate import prompt_text, prompt_token_count

    images = [Image.new("RGB", size) for size in sizes]
    example = Example(id="1", images=images, question="<image>" * len(images) + "Which bar?", answer="a", source="s")
    encoded = Collator(processor)([example])["prompt"]
    assert prompt_token_count(processor, prompt_text(processor, example), images) == int(
        encoded["attention_mask"].sum()
    )


def test_the_prompt_limit_counts_image_tokens_and_checks_characters_before_tokenizing(processor, monkeypatch):
    from vlm_post.data import limits
    from vlm_post.data.collate import prompt_text, prompt_token_count
    from vlm_post.data.sources import BadRow

    image = Image.new("RGB", (112, 112))
    example = Example(id="1", images=[image], question="<image>Which bar?", answer="a", source="s")
    tokens = prompt_token_count(processor, prompt_text(processor, example), [image])
    text_only = prompt_token_count(processor, prompt_text(processor, example), [])
    assert tokens - text_only == 16 - 1  # the image's 16 tokens, where the text had one placeholder
    limits.PromptLimit(tokens, DEFAULT_INSTRUCTION, processor).check(example)
    with pytest.raises(
        BadRow, match=rf"prompt of {tokens} tokens \(text and images\), over data.max_prompt_length={tokens - 1}$"
    ):
        limits.PromptLimit(tokens - 1, DEFAULT_INSTRUCTION, processor).check(example)
    monkeypatch.setattr(limits, "prompt_token_count", lambda *args: pytest.fail("a huge question was tokenized"))
    huge = Example(id="2", images=[image], question="x" * 1601, answer="a", source="s")
    with pytest.raises(
        BadRow,
        match=r"question of 1,601 characters, over the bound of 1,600 \(16 per token of data.max_prompt_length=100\); not tokenized",
    ):
        limits.PromptLimit(100, DEFAULT_INSTRUCTION, processor).check(huge)
    limits.PromptLimit(100, DEFAULT_INSTRUCTION, None).check(example)  # without a processor: characters only


def test_the_default_prompt_limit_keeps_every_demo_row(processor, demo_data):
    dm = _datamodule(processor, train=DataSource("demo_train", path=str(demo_data / "train.parquet")), min_pixels=12544)
    assert dm.max_prompt_length == 8192
    dm.setup("fit")
    assert dm.skipped == {"demo_train": 0} and len(dm.datasets["demo_train"]) == 128


def test_an_unsupported_or_empty_path_is_named_at_construction(tmp_path):
    _write(tmp_path / "rows.csv", b"id,problem\n1,a\n")
    with pytest.raises(
        ConfigError, match=r"'s': .*rows.csv: unsupported data file format '.csv' \(read: .arrow, .json"
    ):
        VLMDataModule(train=DataSource("s", path=str(tmp_path / "rows.csv")))
    with pytest.raises(
        ConfigError, match=r"'s': no data files \(.arrow, .json, .jsonl, .parquet or a save_to_disk folder\) in folder"
    ):
        VLMDataModule(train=DataSource("s", path=str(tmp_path)))
