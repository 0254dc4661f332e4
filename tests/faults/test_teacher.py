"""Faults a user meets through ``vlm_post fit``: a teacher-logit cache that another teacher scored.

The demo's OPD config runs a step with teacher A into a cache; the same command with teacher B (the same shape and
tokenizer, other weights) must not train on A's scores: it stops with one line naming both fingerprints and the
cache folder, exit 2, and leaves the cache byte for byte as it was. With ``teacher.on_mismatch: rescore`` it scores
anew into a namespace of its own inside the cache, and A's scores stay as they are.
"""

from __future__ import annotations

import json

import pytest

from tests.test_teacher_cache import snapshot
from vlm_post.cli import main
from vlm_post.teacher import TeacherCache, fingerprint_teacher

pytestmark = pytest.mark.slow

OPD = "configs/demo/opd.yaml"


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """Teachers A and B: tiny Qwen2.5-VLs with the student's tokenizer and shape, other weights."""
    from vlm_post.models.tiny import build_tiny_qwen2_5_vl

    root = tmp_path_factory.mktemp("teachers")
    return tuple(
        build_tiny_qwen2_5_vl(root / name, seed=seed, hidden_size=192) for name, seed in (("a", 11), ("b", 12))
    )


def fit(teacher, cache, root, capsys, *extra: str) -> tuple[int, str]:
    """``vlm_post fit`` on the demo's OPD config, one step of 2 prompts: (exit status, stderr)."""
    args = [
        "fit", "--config", OPD,
        f"--model.init_args.teacher.model_name_or_path={teacher}",
        f"--model.init_args.teacher.cache_dir={cache}",
        f"--trainer.default_root_dir={root}",
        "--trainer.max_steps=1", "--trainer.logger=false", "--export.enabled=false", "--data.batch_size=2",
        *extra,
    ]  # fmt: skip
    capsys.readouterr()
    try:
        main(args)
        status = 0
    except SystemExit as stop:
        status = stop.code
    return status, capsys.readouterr().err


@pytest.fixture
def demo(tiny_model, demo_data):
    """The demo's student and data, built offline by the conftest fixtures."""
    return [
        f"--model.init_args.model_name_or_path={tiny_model}",
        f"--data.train.path={demo_data / 'train.parquet'}",
        f"--data.val=[{{name: demo_val, path: {demo_data / 'validation.parquet'}}}]",
    ]


def fingerprint(teacher):
    return fingerprint_teacher(teacher, top_k=32, cache_dtype="float16")  # the demo config's settings


def test_a_cache_of_another_teacher_stops_fit_with_one_line_and_is_left_untouched(teachers, demo, tmp_path, capsys):
    teacher_a, teacher_b = teachers
    cache = tmp_path / "teacher_cache"
    status, err = fit(teacher_a, cache, tmp_path / "a", capsys, *demo)
    assert status == 0, err
    assert TeacherCache(cache).teacher == fingerprint(teacher_a) and 1 <= len(TeacherCache(cache)) <= 4
    before = snapshot(cache)

    status, err = fit(teacher_b, cache, tmp_path / "b", capsys, *demo)
    assert status == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    a, b = fingerprint(teacher_a).short, fingerprint(teacher_b).short
    assert err.startswith(f"vlm_post: error: teacher cache {cache} holds the scores of teacher {a} ({teacher_a}), "
                          f"not of this teacher {b} ({teacher_b}) (this vs cached: weights): "), err  # fmt: skip
    assert f"set model.teacher.on_mismatch: rescore to score anew into {cache}/teacher-{b}" in err
    assert snapshot(cache) == before
    assert sorted(p.name for p in cache.iterdir()) == sorted([*before, ".lock-rank0"]), "no file added"


def test_rescore_scores_into_a_namespace_and_keeps_the_other_teachers_scores(teachers, demo, tmp_path, capsys,
                                                                            caplog):  # fmt: skip
    teacher_a, teacher_b = teachers
    cache = tmp_path / "teacher_cache"
    assert fit(teacher_a, cache, tmp_path / "a", capsys, *demo)[0] == 0
    before = snapshot(cache)

    status, err = fit(teacher_b, cache, tmp_path / "b", capsys, *demo, "--model.init_args.teacher.on_mismatch=rescore")
    assert status == 0, err
    namespace = cache / f"teacher-{fingerprint(teacher_b).short}"
    assert f"scoring anew into {namespace}" in caplog.text  # Lightning's info log says where the scores go
    assert TeacherCache(namespace).teacher == fingerprint(teacher_b) and 1 <= len(TeacherCache(namespace)) <= 4
    assert json.loads((namespace / "teacher.json").read_text())["source"] == str(teacher_b)
    assert {name: data for name, data in snapshot(cache).items() if not name.startswith(namespace.name)} == before
    assert TeacherCache(cache).teacher == fingerprint(teacher_a), "the root is still teacher A's"


def test_a_cache_from_before_the_fingerprint_is_refused_with_the_fix(teachers, demo, tmp_path, capsys):
    from tests.test_teacher_cache import write

    cache = tmp_path / "old_cache"
    write(cache, range(2), k=32)  # scores, no teacher.json: as caches were written before the fingerprint
    before = snapshot(cache)
    status, err = fit(teachers[0], cache, tmp_path / "a", capsys, *demo)
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert f"teacher cache {cache} holds 2 scored responses but no teacher fingerprint" in err
    assert "model.teacher.on_mismatch: rescore" in err
    assert snapshot(cache) == before
