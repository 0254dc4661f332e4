"""Bad data files and rows, driven through ``vlm_post fit`` as a user meets them (issue #13, item 3).

A row that cannot be loaded (a non-UTF-8 byte, a line that is not JSON or not an object, an empty line, a prompt far
too long) is reported by its file and line or its id, skipped and counted, and the run trains on the good rows. A
file that cannot be read at all is one error line naming it, exit status 2, and no traceback.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import datasets
import pytest

from tests.faults.common import error_line
from vlm_post.cli import main

DEMO = "configs/demo/sft.yaml"
GOOD_ROWS = 8


@pytest.fixture
def good_lines(demo_data, tmp_path) -> list[bytes]:
    """The first demo training rows as JSON lines, their images as files beside the data file."""
    rows = datasets.Dataset.from_parquet(str(demo_data / "train.parquet"))
    rows = rows.cast_column("images", datasets.Sequence(datasets.Image(decode=False)))
    (tmp_path / "images").mkdir()
    lines = []
    for row in rows.select(range(GOOD_ROWS)):
        image = f"images/{row['id']}.png"
        (tmp_path / image).write_bytes(row["images"][0]["bytes"])
        lines.append(json.dumps({**row, "images": [image]}).encode())
    return lines


def write_jsonl(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def fit(args: list[str], tiny_model, demo_data, root: Path, capsys) -> tuple[int, str, list[str]]:
    """``vlm_post fit`` on the demo SFT config, 2 steps of 2 rows: (exit status, stderr, warning messages)."""
    overrides = [
        f"--model.init_args.model_name_or_path={tiny_model}",
        f"--data.val=[{{name: demo_val, path: {demo_data / 'validation.parquet'}, limit: 4}}]",
        "--data.batch_size=2",
        "--trainer.max_steps=2",
        "--trainer.val_check_interval=2",
        f"--trainer.default_root_dir={root}",
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            main(["fit", "--config", DEMO, *overrides, *args])
            status = 0
        except SystemExit as exit_info:
            status = exit_info.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    return status, err, [str(w.message) for w in caught]


def trained_steps(root: Path) -> int:
    return json.loads((root / "export" / "vlm_post_export.json").read_text())["global_step"]


@pytest.mark.slow
def test_unreadable_lines_are_skipped_by_file_and_line_and_the_rest_trains(
    good_lines, tiny_model, demo_data, tmp_path, capsys
):
    """One dirty file: a non-UTF-8 byte, a broken line, an array, an empty line, among good rows."""
    lines = list(good_lines)
    lines.insert(2, good_lines[2].replace(b"longer", b"lon\xffger"))  # line 3
    lines.insert(4, b'{"id": 99, "problem": ')  # line 5
    lines.insert(6, b"[1, 2]")  # line 7
    lines.insert(8, b"")  # line 9
    data = write_jsonl(tmp_path / "train.jsonl", lines)
    status, _, reports = fit([f"--data.train.path={data}"], tiny_model, demo_data, tmp_path / "run", capsys)
    assert status == 0, reports
    skipped = [r for r in reports if "skipped row" in r]
    assert all("\n" not in report for report in skipped)
    assert skipped == [
        f"data source 'demo_train': skipped row {data} line 3: not valid UTF-8: byte 0xff at column 65",
        f"data source 'demo_train': skipped row {data} line 5: not valid JSON: Expecting value at column 23",
        f"data source 'demo_train': skipped row {data} line 7: a JSON array, not an object",
        f"data source 'demo_train': skipped row {data} line 9: empty line",
    ]
    assert f"data source 'demo_train': skipped 4 of {GOOD_ROWS + 4} rows" in reports
    assert trained_steps(tmp_path / "run") == 2


@pytest.mark.slow
def test_fail_fast_stops_at_the_first_unreadable_line(good_lines, tiny_model, demo_data, tmp_path, capsys):
    lines = [*good_lines[:3], good_lines[3].replace(b"longer", b"lon\xffger"), *good_lines[4:]]
    data = write_jsonl(tmp_path / "train.jsonl", lines)
    status, err, _ = fit(
        [f"--data.train.path={data}", "--data.fail_fast=true"], tiny_model, demo_data, tmp_path, capsys
    )
    assert status == 2
    line = error_line(err)
    assert (
        line
        == f"vlm_post: error: data source 'demo_train': bad row {data} line 4: not valid UTF-8: byte 0xff at column 65"
    )


@pytest.mark.slow
def test_a_10_mb_question_is_skipped_by_id_and_never_tokenized(
    good_lines, tiny_model, demo_data, tmp_path, capsys, monkeypatch
):
    from vlm_post.data import limits

    huge = json.loads(good_lines[1]) | {"id": 1001, "problem": "<image>" + "Which bar is longer?" * 500_000}
    data = write_jsonl(tmp_path / "train.jsonl", [*good_lines, json.dumps(huge).encode()])
    counted = []  # the length of every prompt text the token check tokenizes
    count = limits.prompt_token_count
    monkeypatch.setattr(
        limits,
        "prompt_token_count",
        lambda processor, text, images: counted.append(len(text)) or count(processor, text, images),
    )
    status, _, reports = fit([f"--data.train.path={data}"], tiny_model, demo_data, tmp_path, capsys)
    assert status == 0, reports
    assert (
        "data source 'demo_train': skipped row id=1001: question of 10,000,007 characters, over the bound of 131,072 "
        "(16 per token of data.max_prompt_length=8192); not tokenized"
    ) in reports
    assert f"data source 'demo_train': skipped 1 of {GOOD_ROWS + 1} rows" in reports
    assert len(counted) == GOOD_ROWS + 4 and max(counted) < 1000  # the training rows and the 4 validation rows
    assert trained_steps(tmp_path) == 2


@pytest.mark.slow
def test_a_prompt_over_max_prompt_length_is_skipped_with_its_length(
    good_lines, tiny_model, demo_data, tmp_path, capsys
):
    """The demo's prompts are 66 tokens, 16 of them the image's: a limit of 80 passes them, not a longer question."""
    long = json.loads(good_lines[1]) | {
        "id": 1002,
        "problem": "<image>Which bar is longer, the red one or the blue one? " * 4,
    }
    data = write_jsonl(tmp_path / "train.jsonl", [*good_lines, json.dumps(long).encode()])
    status, _, reports = fit(
        [f"--data.train.path={data}", "--data.max_prompt_length=80"], tiny_model, demo_data, tmp_path, capsys
    )
    assert status == 0, reports
    skipped = [r for r in reports if "skipped row" in r]
    assert len(skipped) == 1 and skipped[0].startswith("data source 'demo_train': skipped row id=1002: prompt of ")
    assert skipped[0].endswith(" tokens (text and images), over data.max_prompt_length=80")
    assert trained_steps(tmp_path) == 2


@pytest.mark.slow
def test_every_row_unreadable_is_one_line_naming_the_first(tiny_model, demo_data, tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", [b"\xff\xfe", b"not json"])
    status, err, _ = fit([f"--data.train.path={data}"], tiny_model, demo_data, tmp_path, capsys)
    assert status == 2
    assert error_line(err) == (
        f"vlm_post: error: data source 'demo_train': no usable rows in '{data}' "
        f"(first: {data} line 1: not valid UTF-8: byte 0xff at column 1)"
    )


@pytest.fixture
def weights_loaded(monkeypatch) -> list:
    """Records every policy load: the data is set up, and any error in it said, before the weights load."""
    from vlm_post.modules import base

    loads: list = []
    load_policy = base.load_policy
    monkeypatch.setattr(base, "load_policy", lambda *a, **k: loads.append(a) or load_policy(*a, **k))
    return loads


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("train.parquet", b"PAR1 half a download", "not a readable parquet file (ArrowInvalid: "),
        ("train.csv", b"id,problem\n1,\xff\n", "unsupported data file format '.csv'"),
        ("train.json", b'[{"id": 1, "problem": "caf\xe9"}]', "not valid UTF-8: byte 0xe9 at line 1"),
        ("train.json", b'[{"id": 1,\n "problem": }]', "not valid JSON at line 2, column 13: Expecting value"),
    ],
    ids=["corrupt-parquet", "csv", "json-document-not-utf8", "json-document-broken"],
)
def test_a_file_that_cannot_be_read_is_one_line_naming_it(
    name, content, message, tiny_model, demo_data, tmp_path, capsys, weights_loaded
):
    """A JSON document is one value: a bad byte in it spoils the file, not one row, and shows when it is read."""
    data = tmp_path / name
    data.write_bytes(content)
    status, err, _ = fit([f"--data.train.path={data}"], tiny_model, demo_data, tmp_path, capsys)
    assert status == 2
    line = error_line(err)
    assert line.startswith(f"vlm_post: error: data source 'demo_train': {data}: ") and message in line, line
    assert not weights_loaded


@pytest.mark.fast
def test_a_corrupt_shard_in_a_folder_is_named(demo_data, tiny_model, tmp_path, capsys, weights_loaded):
    folder = tmp_path / "shards"
    folder.mkdir()
    (folder / "train-00000-of-00002.parquet").write_bytes((demo_data / "train.parquet").read_bytes())
    (folder / "train-00001-of-00002.parquet").write_bytes(
        (demo_data / "train.parquet").read_bytes()[:-100]
    )  # cut short
    (folder / "test-00000-of-00001.parquet").write_bytes(b"another split's file, not read by this run")
    status, err, _ = fit([f"--data.train.path={folder}"], tiny_model, demo_data, tmp_path, capsys)
    assert status == 2
    assert f"{folder / 'train-00001-of-00002.parquet'}: not a readable parquet file" in error_line(err)
    assert not weights_loaded
