"""DistillModule on tiny models: the OPD loop, teacher alignment, the teacher cache and teacher checks."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback

from tests.helpers import demo_datamodule, trainable_weights, trainer, unmoved
from tests.test_teacher_cache import snapshot
from vlm_post.errors import ConfigError
from vlm_post.modules import DistillLossConfig, DistillModule, EvalConfig, OptimConfig, TeacherConfig
from vlm_post.rollout import SamplingParams
from vlm_post.teacher import TeacherCache, TeacherFingerprintError


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    """A wider tiny Qwen2.5-VL with the student's tokenizer (the tokenizer is trained deterministically)."""
    from vlm_post.models.tiny import build_tiny_qwen2_5_vl

    return build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("teacher") / "teacher", seed=1, hidden_size=192)


@pytest.fixture(scope="module")
def other_teacher(tmp_path_factory):
    """Another teacher of the same shape and tokenizer: only its weights differ."""
    from vlm_post.models.tiny import build_tiny_qwen2_5_vl

    return build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("other") / "other", seed=2, hidden_size=192)


class Record(Callback):
    def __init__(self) -> None:
        self.metrics: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def distill_module(student, teacher: TeacherConfig, **kwargs) -> DistillModule:
    kwargs.setdefault("rollout", SamplingParams(n=2, temperature=1.0, max_new_tokens=6))
    return DistillModule(
        str(student),
        teacher=teacher,
        optim=kwargs.pop("optim", OptimConfig(lr=1e-3)),
        eval=EvalConfig(n=0, max_new_tokens=6),
        micro_batch_size=3,
        **kwargs,
    )


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["topk", "sampled"])
def test_opd_step_trains_the_student_and_logs(tiny_model, tiny_teacher, demo_data, tmp_path, kind):
    torch.manual_seed(0)
    module = distill_module(
        tiny_model,
        TeacherConfig(model_name_or_path=str(tiny_teacher), top_k=16),
        loss=DistillLossConfig(kind=kind),
        epochs=2,
        mini_batch_size=2,
    )
    module.configure_model()
    before = trainable_weights(module.policy)
    record = Record()
    trainer(tmp_path, max_steps=4, callbacks=[record]).fit(module, demo_datamodule(demo_data, batch_size=4))
    assert module.trainer.global_step == 4  # 4 prompts, mini-batches of 2, 2 epochs: 4 updates per round
    assert before and not unmoved(module.policy, before), (
        f"trainable weights that did not move: {unmoved(module.policy, before)}"
    )
    logged = record.metrics[-1]
    for key in (
        "train/reverse_kl",
        "train/entropy",
        "train/teacher_entropy_topk",
        "train/accuracy",
        "train/response_length",
        "train/time_teacher_s",
        "train/tokens_per_s",
    ):
        assert key in logged, key
    assert logged["train/reverse_kl"] > 0 and logged["train/teacher_scored_rows"] == 8


@pytest.mark.slow
def test_step_metrics_are_computed_only_on_steps_the_logger_writes(tiny_model, tiny_teacher, demo_data, tmp_path):
    """Lightning writes a training step's values every log_every_n_steps; on the other steps the module skips
    its metrics, accuracy grading included."""
    module = distill_module(tiny_model, TeacherConfig(model_name_or_path=str(tiny_teacher), top_k=8))
    graded = []
    real_scores = module.accuracy.scores
    module.accuracy.scores = lambda *args: graded.append(1) or real_scores(*args)
    record = Record()
    trainer(tmp_path, max_steps=4, log_every_n_steps=2, callbacks=[record]).fit(
        module, demo_datamodule(demo_data, batch_size=2)
    )
    assert len(graded) == 2
    assert "train/reverse_kl" not in record.metrics[0] and "train/reverse_kl" in record.metrics[1]


@pytest.mark.slow
def test_a_teacher_equal_to_the_student_scores_zero_reverse_kl(tiny_model, demo_data, tmp_path):
    """With k = the whole vocabulary the top-k KL is the exact KL, so a teacher with the student's own weights
    gives 0 at every position: any misalignment of teacher positions (off by one token, lost mrope inputs)
    would show up as a large KL."""
    vocab = len(__import__("transformers").AutoTokenizer.from_pretrained(str(tiny_model)))
    module = distill_module(
        tiny_model, TeacherConfig(model_name_or_path=str(tiny_model), top_k=vocab), optim=OptimConfig(lr=0.0)
    )
    record = Record()
    trainer(tmp_path, max_steps=2, callbacks=[record]).fit(module, demo_datamodule(demo_data, batch_size=4))
    assert all(abs(m["train/reverse_kl"]) < 1e-4 for m in record.metrics), [
        m["train/reverse_kl"] for m in record.metrics
    ]
    # ... and the student's exact entropy equals the teacher's (its top-k coarsening is exact at k = V)
    last = record.metrics[-1]
    assert last["train/entropy"] == pytest.approx(last["train/teacher_entropy_topk"], rel=1e-3)


@pytest.mark.slow
def test_the_cache_is_written_and_a_rerun_reuses_it_without_scoring(tiny_model, tiny_teacher, demo_data, tmp_path):
    teacher = TeacherConfig(model_name_or_path=str(tiny_teacher), cache_dir=str(tmp_path / "cache"), top_k=8)
    runs = []
    for attempt in range(2):
        torch.manual_seed(0)  # the same samples again: every row is a cache hit
        module = distill_module(tiny_model, teacher, optim=OptimConfig(lr=0.0))
        record = Record()
        trainer(tmp_path / str(attempt), max_steps=2, callbacks=[record]).fit(
            module, demo_datamodule(demo_data, batch_size=4)
        )
        runs.append((module.teacher_scored_rows, [m["train/reverse_kl"] for m in record.metrics]))
    assert runs[0][0] == 16 and runs[1][0] == 0
    assert runs[1][1] == pytest.approx(runs[0][1], abs=1e-3), "cached scores must give the same loss (fp16 rounding)"
    assert len(TeacherCache(tmp_path / "cache")) <= 16


@pytest.mark.slow
def test_cache_only_mode_without_scores_stops_with_a_message(tiny_model, demo_data, tmp_path):
    module = distill_module(tiny_model, TeacherConfig(cache_dir=str(tmp_path / "empty_cache"), wait_s=0))
    with pytest.raises(ConfigError, match=r"empty_cache.*no scores for 8 of 8 responses.*score_teacher"):
        trainer(tmp_path, max_steps=1).fit(module, demo_datamodule(demo_data, batch_size=4))


@pytest.mark.fast
def test_a_teacher_with_another_tokenizer_is_refused(tiny_model, tmp_path):
    from vlm_post.models.tiny import build_tiny_qwen2_5_vl

    other = build_tiny_qwen2_5_vl(tmp_path / "other", vocab_size=420)
    with pytest.raises(ConfigError, match=r"teacher .*other.*tokenizer differs from the student's"):
        distill_module(tiny_model, TeacherConfig(model_name_or_path=str(other)))


@pytest.mark.fast
def test_a_teacher_is_required(tiny_model):
    with pytest.raises(ConfigError, match="model.teacher"):
        distill_module(tiny_model, TeacherConfig())


@pytest.mark.slow
def test_an_external_scorer_fills_the_cache_the_student_waits_for(tiny_model, tiny_teacher, other_teacher, demo_data,
                                                                  tmp_path, capsys):  # fmt: skip
    """Cache-only training writes rollout files; tools/score_teacher.py scores them from the student's config;
    the rerun trains on exactly the scores an in-process teacher gives."""
    import importlib.util

    import yaml

    from vlm_post.teacher import HFTeacher

    cache = tmp_path / "cache"
    config = {
        "model": {"class_path": "vlm_post.modules.DistillModule", "init_args": {
            "model_name_or_path": str(tiny_model), "teacher": {"cache_dir": str(cache), "top_k": 8}}},
        "data": {"train": {"name": "demo_train", "path": str(demo_data / "train.parquet")},
                 "batch_size": 4, "min_pixels": 12544, "max_pixels": 12544},
    }  # fmt: skip
    (tmp_path / "opd.yaml").write_text(yaml.safe_dump(config))

    def fit(teacher: TeacherConfig, root: str) -> tuple[DistillModule, Record]:
        torch.manual_seed(0)
        module, record = distill_module(tiny_model, teacher, optim=OptimConfig(lr=0.0)), Record()
        trainer(tmp_path / root, max_steps=1, callbacks=[record]).fit(module, demo_datamodule(demo_data, batch_size=4))
        return module, record

    with pytest.raises(ConfigError, match="no scores for 8 of 8"):
        fit(TeacherConfig(cache_dir=str(cache), top_k=8), "waiting")
    assert [p.name for p in (cache / "rollouts").glob("*.jsonl")] == ["rank0-step000000000.jsonl"]

    spec = importlib.util.spec_from_file_location("score_teacher", "tools/score_teacher.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["--config", str(tmp_path / "opd.yaml"), "--teacher", str(tiny_teacher)]) == 0
    assert (cache / "rollouts" / "rank0-step000000000.jsonl.done").exists()

    cached, cached_record = fit(TeacherConfig(cache_dir=str(cache), top_k=8), "cached")
    assert cached.teacher_scored_rows == 0
    # the scorer records the fingerprint an in-process teacher has: the same teacher in-process reuses its scores
    assert TeacherCache(cache).teacher == HFTeacher(str(tiny_teacher), cached.processor, 8).fingerprint("float16")
    in_process, _ = fit(TeacherConfig(model_name_or_path=str(tiny_teacher), cache_dir=str(cache), top_k=8), "same")
    assert in_process.teacher_scored_rows == 0
    # a scorer of another teacher is refused before it writes anything
    before = snapshot(cache)
    capsys.readouterr()
    assert tool.main(["--config", str(tmp_path / "opd.yaml"), "--teacher", str(other_teacher)]) == 2
    err = capsys.readouterr().err
    assert f"score_teacher: teacher cache {cache} holds the scores of teacher " in err and "weights" in err
    assert "set model.init_args.teacher.cache_dir to a new folder" in err
    assert snapshot(cache) == before
    live, live_record = fit(TeacherConfig(model_name_or_path=str(tiny_teacher), top_k=8), "live")
    assert live.teacher_scored_rows == 8
    assert cached_record.metrics[0]["train/reverse_kl"] == pytest.approx(
        live_record.metrics[0]["train/reverse_kl"], abs=1e-3
    )


@pytest.mark.fast
def test_the_scorer_refuses_prompts_that_differ_from_the_students(tiny_model, tiny_teacher, demo_data, tmp_path):
    from vlm_post.teacher import HFTeacher, TeacherCacheWriter
    from vlm_post.teacher.external import RolloutScorer
    from vlm_post.teacher.rollout_files import write_rollout_file

    data = demo_datamodule(demo_data, batch_size=4)
    processor = __import__("vlm_post.models.loading", fromlist=["x"]).load_processor(str(tiny_model))
    teacher = HFTeacher(str(tiny_teacher), processor, top_k=4).load("cpu")
    with TeacherCacheWriter(tmp_path, k=4) as writer:
        scorer = RolloutScorer(data, teacher, writer)
        first_id = scorer.dataset[0].id
        path = write_rollout_file(
            tmp_path, "bad", [{"example_id": first_id, "prompt_ids": [1, 2, 3], "response_ids": [5]}]
        )
        with pytest.raises(
            ConfigError, match=rf"bad.jsonl: example '{first_id}': this config's prompt has other token ids"
        ):
            scorer.score_file(path)


@pytest.mark.slow
def test_resume_from_a_checkpoint_reuses_the_cached_scores(tiny_model, tiny_teacher, demo_data, tmp_path):
    """A run resumed with --ckpt_path re-samples the same responses (RNG and data position restored), so the
    teacher scores none of them again."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    teacher = TeacherConfig(model_name_or_path=str(tiny_teacher), cache_dir=str(tmp_path / "cache"), top_k=8)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1)
    torch.manual_seed(0)
    first = distill_module(tiny_model, teacher)
    trainer(tmp_path / "a", max_steps=2, enable_checkpointing=True, callbacks=[checkpoints]).fit(
        first, demo_datamodule(demo_data, batch_size=4)
    )
    assert first.teacher_scored_rows == 16
    step1 = next((tmp_path / "ckpt").glob("*step=1.ckpt"))
    resumed = distill_module(tiny_model, teacher)
    trainer(tmp_path / "b", max_steps=2).fit(resumed, demo_datamodule(demo_data, batch_size=4), ckpt_path=step1)
    assert resumed.trainer.global_step == 2 and resumed.teacher_scored_rows == 0
    for key, value in resumed.policy.state_dict().items():
        assert torch.allclose(value, first.policy.state_dict()[key], atol=1e-6), key


@pytest.mark.slow
def test_a_cache_of_another_teacher_is_refused_unless_rescoring(tiny_model, tiny_teacher, other_teacher, demo_data,
                                                               tmp_path):  # fmt: skip
    """Teacher B is refused teacher A's cache before it changes a byte; rescoring, it scores into its namespace,
    which a second rescoring run reuses, and teacher A, rescoring too, still finds its scores at the root."""
    cache = tmp_path / "cache"

    def fit(teacher_path, root: str, **config) -> DistillModule:
        torch.manual_seed(0)  # the same samples on every run
        teacher = TeacherConfig(model_name_or_path=str(teacher_path), cache_dir=str(cache), top_k=8, **config)
        module = distill_module(tiny_model, teacher, optim=OptimConfig(lr=0.0))
        trainer(tmp_path / root, max_steps=1).fit(module, demo_datamodule(demo_data, batch_size=4))
        return module

    assert fit(tiny_teacher, "a").teacher_scored_rows == 8
    before = snapshot(cache)
    with pytest.raises(TeacherFingerprintError, match=r"holds the scores of teacher \w{12} .*this vs cached: weights"):
        fit(other_teacher, "b")
    assert snapshot(cache) == before
    rescored = fit(other_teacher, "b_rescore", on_mismatch="rescore")
    namespace = cache / f"teacher-{rescored.teacher_fingerprint.short}"
    assert rescored.teacher_scored_rows == 8 and TeacherCache(namespace).teacher == rescored.teacher_fingerprint
    assert {k: v for k, v in snapshot(cache).items() if not k.startswith("teacher-")} == before
    assert fit(other_teacher, "b_again", on_mismatch="rescore").teacher_scored_rows == 0
    assert fit(tiny_teacher, "a_again", on_mismatch="rescore").teacher_scored_rows == 0


@pytest.mark.fast
def test_rescoring_needs_an_in_process_teacher(tiny_model, tmp_path):
    with pytest.raises(ConfigError, match=r"on_mismatch: rescore needs an in-process teacher"):
        distill_module(tiny_model, TeacherConfig(cache_dir=str(tmp_path), on_mismatch="rescore"))


@pytest.mark.slow
def test_a_cache_only_run_refuses_scores_of_another_top_k(tiny_model, tiny_teacher, demo_data, tmp_path):
    cache = str(tmp_path / "cache")
    torch.manual_seed(0)
    module = distill_module(tiny_model, TeacherConfig(model_name_or_path=str(tiny_teacher), cache_dir=cache, top_k=8))
    trainer(tmp_path / "a", max_steps=1).fit(module, demo_datamodule(demo_data, batch_size=2))
    reader = distill_module(tiny_model, TeacherConfig(cache_dir=cache, top_k=4))
    with pytest.raises(ConfigError, match=r"holds top_k=8 float16 scores, model.teacher asks for top_k=4 float16"):
        trainer(tmp_path / "b", max_steps=1).fit(reader, demo_datamodule(demo_data, batch_size=2))
