"""The teacher-logit cache: exact round trips, shards, resume, concurrent writers, the teacher it records, and
loud failures."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import re
import shutil

import numpy as np
import pytest
import torch

from vlm_post.teacher import (
    TeacherCache,
    TeacherCacheError,
    TeacherCacheMismatchError,
    TeacherCacheWriter,
    TeacherFingerprint,
    TeacherFingerprintError,
    TeacherScores,
    entry_key,
    namespace_dir,
    pad_scores,
    read_cache_teacher,
    rescore_dir,
)

pytestmark = pytest.mark.fast


def fake_teacher(name: str, k: int = 8, dtype: str = "float16") -> TeacherFingerprint:
    """A made-up teacher's fingerprint: the cache compares digests and never reads a teacher."""

    def part(what: str) -> str:
        return hashlib.sha256(f"{name}/{what}".encode()).hexdigest()

    settings = {"top_k": k, "cache_dtype": dtype, "dtype": "float32", "temperature": 1.0, "scoring": 1}
    return TeacherFingerprint(part("weights"), part("config"), part("tokenizer"), settings, source=f"teachers/{name}")


TEACHER_A = fake_teacher("a")
TEACHER_B = dataclasses.replace(TEACHER_A, weights=fake_teacher("b").weights, source="teachers/b")  # other weights


def snapshot(folder) -> dict[str, bytes]:
    """Every file under ``folder`` and its bytes, lock files left out (they hold nothing)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.startswith(".lock-")}  # fmt: skip


def rollout(i: int, length: int | None = None, prompt_len: int = 7) -> tuple[str, list[int], list[int]]:
    g = torch.Generator().manual_seed(1000 + i)
    length = 5 + 3 * i if length is None else length
    prompt = torch.randint(0, 150_000, (prompt_len,), generator=g).tolist()
    return f"step0/prompt{i}/sample0", prompt, torch.randint(0, 150_000, (length,), generator=g).tolist()


def scores(i: int, length: int, k: int = 8) -> TeacherScores:
    """fp32 scores as a teacher produces them: sorted top-k log-probs, ids up to 151,935."""
    g = torch.Generator().manual_seed(i)
    logprobs = torch.log_softmax(torch.randn(length, 200, generator=g) * 3, -1).topk(k).values
    return TeacherScores(
        topk_ids=torch.randint(0, 151_936, (length, k), generator=g),  # int64, as topk returns them
        topk_logprobs=logprobs,
        sampled_logprobs=logprobs[:, 0] - torch.rand(length, generator=g),
    )


def write(cache_dir, ids, k=8, **kwargs) -> dict[int, TeacherScores]:
    written = {}
    with TeacherCacheWriter(cache_dir, k=k, **kwargs) as writer:
        for i in ids:
            example_id, prompt, response = rollout(i)
            written[i] = scores(i, len(response), k)
            assert writer.add(example_id, prompt, response, written[i])
    return written


def assert_same(read: TeacherScores, written: TeacherScores, dtype: torch.dtype) -> None:
    assert read.topk_ids.dtype == torch.int32 and read.topk_logprobs.dtype == read.sampled_logprobs.dtype == dtype
    assert torch.equal(read.topk_ids, written.topk_ids.to(torch.int32))
    assert torch.equal(read.topk_logprobs, written.topk_logprobs.to(dtype))
    assert torch.equal(read.sampled_logprobs, written.sampled_logprobs.to(dtype))


def shard_files(cache_dir) -> list:
    return sorted(cache_dir.glob("*.safetensors"))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_round_trip_is_exact(tmp_path, dtype):
    written = write(tmp_path, range(6), dtype=dtype)
    cache = TeacherCache(tmp_path)
    assert len(cache) == 6 and cache.k == 8 and cache.dtype == getattr(torch, dtype) and cache.num_shards == 1
    for i in range(6):
        example_id, prompt, response = rollout(i)
        assert entry_key(example_id, prompt, response) in cache
        # the tokens may come as a list, a numpy array or a tensor of any integer dtype
        for as_ids in (list, np.array, torch.tensor, lambda x: torch.tensor(x, dtype=torch.int32)):
            assert_same(cache.require(example_id, as_ids(prompt), as_ids(response)), written[i], getattr(torch, dtype))
    batch = cache.require_batch(*zip(*(rollout(i) for i in range(6))))
    assert batch.topk_logprobs.dtype == getattr(torch, dtype) and batch.topk_ids.shape == (6, len(written[5]), 8)
    for i in range(6):
        n = len(written[i])
        assert batch.mask[i].sum() == n
        assert_same(TeacherScores(batch.topk_ids[i, :n], batch.topk_logprobs[i, :n], batch.sampled_logprobs[i, :n]),
                    written[i], getattr(torch, dtype))  # fmt: skip


def test_many_shards_and_padded_batches(tmp_path):
    written = write(tmp_path, range(20), shard_tokens=40)
    cache = TeacherCache(tmp_path)
    assert cache.num_shards == len(shard_files(tmp_path)) > 5 and len(cache) == 20
    assert cache.num_tokens == sum(len(s) for s in written.values())
    requests = [rollout(i) for i in (17, 2, 9)]
    batch = cache.require_batch(*zip(*requests), length=70)
    assert batch.topk_ids.shape == (3, 70, 8) and batch.sampled_logprobs.shape == (3, 70)
    for row, i in enumerate((17, 2, 9)):
        n = len(written[i])
        assert batch.mask[row].tolist() == [True] * n + [False] * (70 - n)
        read = TeacherScores(batch.topk_ids[row, :n], batch.topk_logprobs[row, :n], batch.sampled_logprobs[row, :n])
        assert_same(read, written[i], torch.float16)
        assert not batch.topk_ids[row, n:].any() and not batch.topk_logprobs[row, n:].any()
    with pytest.raises(TeacherCacheError, match=r"no scores for 1 of 2 example ids: 'nope'"):
        cache.require_batch(["nope", requests[0][0]], [[1], requests[0][1]], [[2], requests[0][2]])
    with pytest.raises(ValueError, match="more than length=10"):
        pad_scores([written[3]], length=10)


def test_a_batch_lookup_pads_what_the_cache_lacks_and_a_scored_batch_is_added_whole(tmp_path):
    """The step's form both ways: ``add_batch`` takes a padded fp32 batch (the in-process teacher's) and stores each
    row's own positions in the cache dtype; ``lookup_batch`` gives hits and misses as one padded batch."""
    written = {i: scores(i, len(rollout(i)[2])) for i in range(4)}
    fp32 = pad_scores([written[i] for i in range(3)], length=20)
    assert fp32.topk_logprobs.dtype == torch.float32
    with TeacherCacheWriter(tmp_path, k=8) as writer:
        assert writer.add_batch([rollout(i) for i in range(3)], fp32) == 3
        assert writer.add_batch([rollout(0)], pad_scores([written[0]])) == 0  # held already: nothing new
        with pytest.raises(ValueError, match="2 keys for 3 rows"):
            writer.add_batch([rollout(0), rollout(1)], fp32)
    cache = TeacherCache(tmp_path)
    batch, found = cache.lookup_batch([rollout(2), rollout(3), rollout(0)], length=20)
    assert found == [True, False, True] and batch.topk_logprobs.dtype == torch.float16
    for row, i in ((0, 2), (2, 0)):
        n = len(written[i])
        assert batch.mask[row].tolist() == [True] * n + [False] * (20 - n)
        assert_same(list(batch.entries())[row], written[i], torch.float16)
    assert not batch.mask[1].any() and not batch.topk_ids[1].any() and not batch.topk_logprobs[1].any()


def test_resume_appends_shards_and_reuses_cached_scores(tmp_path):
    first = write(tmp_path, range(5), shard_tokens=30)
    shards_before = shard_files(tmp_path)
    reader = TeacherCache(tmp_path)  # open while the teacher resumes; reload() picks up its new shards
    second = {}
    with TeacherCacheWriter(tmp_path, k=8, shard_tokens=30) as writer:
        assert len(writer) == 5
        for i in range(8):  # the resumed teacher walks the same rollouts again
            example_id, prompt, response = rollout(i)
            if entry_key(example_id, prompt, response) in writer:
                continue  # cached: no re-scoring
            second[i] = scores(i, len(response))
            assert writer.add(example_id, prompt, response, second[i])
        assert not writer.add(*rollout(0), first[0])  # adding a cached entry again is a no-op
    assert sorted(second) == [5, 6, 7]
    assert set(shards_before) < set(shard_files(tmp_path)), "old shards kept, new ones appended"
    manifest = json.loads((tmp_path / "manifest-main.json").read_text())
    assert manifest["entries"] == 8 and len(manifest["shards"]) == len(shard_files(tmp_path))
    assert len(reader) == 5 and reader.get(*rollout(6)) is None
    reader.reload()
    for cache in (reader, TeacherCache(tmp_path, verify=False)):
        assert len(cache) == 8
        for i, written in {**first, **second}.items():
            assert_same(cache.require(*rollout(i)), written, torch.float16)


def test_other_tokens_than_the_cached_rollout_miss_or_raise_when_strict(tmp_path):
    write(tmp_path, range(3))
    cache = TeacherCache(tmp_path)
    example_id, prompt, response = rollout(1)
    named = rf"{re.escape(str(tmp_path))}.*'{example_id}'.*main-000000.safetensors"
    others = ((prompt, response[:-1]), (prompt, response[:-1] + [7]), (prompt[1:], response))
    for other_prompt, other_response in others:
        assert cache.get(example_id, other_prompt, other_response) is None  # another sample of the same example
        with pytest.raises(TeacherCacheMismatchError, match=named):
            cache.get(example_id, other_prompt, other_response, strict=True)
        with pytest.raises(TeacherCacheMismatchError, match=named):
            cache.require(example_id, other_prompt, other_response)
    assert cache.get("never/scored", prompt, response) is None
    with pytest.raises(TeacherCacheError, match=rf"{re.escape(str(tmp_path))} has no scores for example id 'never/"):
        cache.require("never/scored", prompt, response)


def test_one_example_id_holds_several_rollouts(tmp_path):
    example_id, prompt, response = rollout(1)
    other = response[:-1] + [7]
    with TeacherCacheWriter(tmp_path, k=8) as writer:
        assert writer.add(example_id, prompt, response, scores(0, len(response)))
        assert writer.add(example_id, prompt, other, scores(1, len(other)))
        assert not writer.add(example_id, prompt, other, scores(1, len(other)))  # the same tokens: already held
    cache = TeacherCache(tmp_path)
    assert len(cache) == 2
    assert_same(cache.get(example_id, prompt, response), scores(0, len(response)), torch.float16)
    assert_same(cache.get(example_id, prompt, other), scores(1, len(other)), torch.float16)


def test_truncated_shard_is_refused(tmp_path):
    write(tmp_path, range(4), shard_tokens=20)
    victim = shard_files(tmp_path)[1]
    victim.write_bytes(victim.read_bytes()[:-100])
    for verify in (True, False):
        with pytest.raises(TeacherCacheError, match=rf"shard {re.escape(str(victim))} is truncated"):
            TeacherCache(tmp_path, verify=verify)


def test_flipped_byte_fails_the_checksum(tmp_path):
    write(tmp_path, range(4), shard_tokens=20)
    victim = shard_files(tmp_path)[1]  # rollout 3; rollouts 0-2 are in the first shard
    data = bytearray(victim.read_bytes())
    data[-10] ^= 0x01  # a log-prob or token id bit: the header is intact, so the cache opens
    victim.write_bytes(bytes(data))
    cache = TeacherCache(tmp_path)
    cache.require(*rollout(0))  # other shards are fine
    with pytest.raises(TeacherCacheError, match=rf"shard {re.escape(str(victim))} is corrupt: its sha256"):
        cache.require(*rollout(3))
    data[-10] ^= 0x01
    data[20] ^= 0x01  # now in the JSON header: refused when the cache is opened
    victim.write_bytes(bytes(data))
    with pytest.raises(TeacherCacheError, match=rf"shard {re.escape(str(victim))} is corrupt: its header"):
        TeacherCache(tmp_path)


def test_stored_response_tokens_are_compared_even_without_verification(tmp_path):
    write(tmp_path, range(2))
    shard = shard_files(tmp_path)[0]
    data = bytearray(shard.read_bytes())
    n = int.from_bytes(data[:8], "little")
    start, _ = json.loads(data[8 : 8 + n])["response_ids"]["data_offsets"]
    data[8 + n + start] ^= 0x01  # the first response token of rollout 0
    shard.write_bytes(bytes(data))
    cache = TeacherCache(tmp_path, verify=False)
    cache.require(*rollout(1))
    with pytest.raises(TeacherCacheMismatchError, match=rf"shard {re.escape(str(shard))}: .* other response tokens"):
        cache.require(*rollout(0))


def test_missing_or_foreign_manifests_are_clear_errors(tmp_path):
    with pytest.raises(TeacherCacheError, match="does not exist"):
        TeacherCache(tmp_path / "nowhere")
    with pytest.raises(TeacherCacheError, match="is not a teacher cache: it has no manifest"):
        TeacherCache(tmp_path)
    write(tmp_path / "c", range(2))
    manifest_path = tmp_path / "c" / "manifest-main.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "version": 2}))
    with pytest.raises(TeacherCacheError, match=r"manifest-main.json has format version 2; this vlm_post reads"):
        TeacherCache(tmp_path / "c")
    manifest_path.write_text("{not json")
    with pytest.raises(TeacherCacheError, match=r"manifest-main.json is unreadable"):
        TeacherCache(tmp_path / "c")
    manifest_path.write_text(json.dumps(manifest))
    (tmp_path / "c" / manifest["shards"][0]["file"]).unlink()
    with pytest.raises(TeacherCacheError, match=r"main-000000.safetensors, listed in manifest-main.json, is missing"):
        TeacherCache(tmp_path / "c")


def test_reopening_with_another_k_or_dtype_is_refused(tmp_path):
    write(tmp_path, range(2))
    with pytest.raises(TeacherCacheError, match="holds k=8 float16 scores; this writer was opened with k=16 float16"):
        TeacherCacheWriter(tmp_path, k=16)
    with pytest.raises(TeacherCacheError, match="k=8 bfloat16"):
        TeacherCacheWriter(tmp_path, k=8, dtype=torch.bfloat16, writer_id="other")


def _writer_process(cache_dir: str, writer_id: str, ids: list[int]) -> None:
    write(cache_dir, ids, writer_id=writer_id, shard_tokens=25)


def test_concurrent_writers_in_separate_processes(tmp_path):
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer_process, args=(str(tmp_path), f"rank{r}", list(range(r, 16, 2))))
             for r in (0, 1)]  # fmt: skip
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert sorted(p.name for p in tmp_path.glob("manifest-*.json")) == ["manifest-rank0.json", "manifest-rank1.json"]
    cache = TeacherCache(tmp_path)
    assert len(cache) == 16
    for i in range(16):
        example_id, prompt, response = rollout(i)
        assert_same(cache.require(example_id, prompt, response), scores(i, len(response)), torch.float16)


def test_one_writer_id_cannot_be_used_twice_at_once(tmp_path):
    with TeacherCacheWriter(tmp_path, k=8, writer_id="rank0", teacher=TEACHER_A):
        with pytest.raises(TeacherCacheError, match="writer id 'rank0' is in use by another process"):
            TeacherCacheWriter(tmp_path, k=8, writer_id="rank0", teacher=TEACHER_A)
        TeacherCacheWriter(tmp_path, k=8, writer_id="rank1", teacher=TEACHER_A).close()
    TeacherCacheWriter(tmp_path, k=8, writer_id="rank0", teacher=TEACHER_A).close()  # released on close
    assert len(TeacherCache(tmp_path)) == 0  # writers that added nothing leave a valid, empty cache


def test_an_orphan_shard_is_ignored_and_its_name_not_reused(tmp_path):
    write(tmp_path, range(2))
    orphan = tmp_path / "main-000001.safetensors"  # a writer killed between the shard and its manifest
    orphan.write_bytes(b"partial")
    write(tmp_path, range(2, 4))
    assert orphan.read_bytes() == b"partial" and (tmp_path / "main-000002.safetensors").exists()
    assert len(TeacherCache(tmp_path)) == 4


def test_bytes_per_token_within_6k_plus_16(tmp_path):
    k, length = 32, 256
    with TeacherCacheWriter(tmp_path, k=k) as writer:
        for i in range(40):
            _, prompt, response = rollout(i, length=length, prompt_len=300)
            writer.add(f"step{i // 8}/prompt{i % 8}/sample{i}", prompt, response, scores(i, length, k))
    total = sum(p.stat().st_size for p in tmp_path.iterdir())  # shards, manifest and lock file
    assert total / (40 * length) <= 6 * k + 16, total / (40 * length)


def test_bad_scores_are_refused_by_the_writer(tmp_path):
    example_id, prompt, response = rollout(0)
    good = scores(0, len(response))
    with TeacherCacheWriter(tmp_path, k=8, teacher=TEACHER_A) as writer:
        with pytest.raises(TeacherCacheError, match=r"shapes"):
            writer.add(example_id, prompt, response + [1], good)
        nan = TeacherScores(good.topk_ids, good.topk_logprobs.clone().fill_(float("nan")), good.sampled_logprobs)
        with pytest.raises(TeacherCacheError, match="NaN"):
            writer.add(example_id, prompt, response, nan)
        with pytest.raises(TeacherCacheError, match="writer_id must match"):
            TeacherCacheWriter(tmp_path, k=8, writer_id="../evil")
    assert len(TeacherCache(tmp_path)) == 0


# --- the teacher the cache records ------------------------------------------------------------------


def test_the_cache_records_the_teacher_that_scored_it(tmp_path):
    write(tmp_path, range(3), teacher=TEACHER_A)
    cache = TeacherCache(tmp_path)
    assert cache.teacher == TEACHER_A and cache.teacher.source == "teachers/a"
    assert json.loads((tmp_path / "manifest-main.json").read_text())["teacher"] == TEACHER_A.digest
    assert json.loads((tmp_path / "teacher.json").read_text())["fingerprint"] == TEACHER_A.digest
    write(tmp_path, range(3, 5), teacher=TEACHER_A, writer_id="rank1")  # the same teacher appends
    assert len(TeacherCache(tmp_path)) == 5


def test_a_writer_of_another_teacher_is_refused_and_changes_nothing(tmp_path):
    write(tmp_path, range(3), teacher=TEACHER_A)
    before = snapshot(tmp_path)
    with pytest.raises(TeacherFingerprintError) as refused:
        TeacherCacheWriter(tmp_path, k=8, writer_id="rank1", teacher=TEACHER_B)
    message = str(refused.value)
    assert f"teacher cache {tmp_path} holds the scores of teacher {TEACHER_A.short} (teachers/a)" in message
    assert f"not of this teacher {TEACHER_B.short} (teachers/b) (this vs cached: weights)" in message
    assert "\n" not in message
    # the settings are part of the teacher: the same model scoring its top 16 is another one
    with pytest.raises(TeacherFingerprintError, match=r"this vs cached: top_k=16 vs 8\)"):
        TeacherCacheWriter(tmp_path, k=16, writer_id="rank2", teacher=fake_teacher("a", k=16))
    assert snapshot(tmp_path) == before and not (tmp_path / ".lock-rank1").exists()


def test_a_writer_that_does_not_know_its_teacher_is_bound_before_it_writes(tmp_path):
    """The external scorer opens its writer before it knows its teacher, and binds it in RolloutScorer."""
    write(tmp_path, range(2), teacher=TEACHER_A)
    before = snapshot(tmp_path)
    refused = pytest.raises(TeacherFingerprintError, match=f"holds the scores of teacher {TEACHER_A.short}")
    with TeacherCacheWriter(tmp_path, k=8, writer_id="scorer-b") as writer, refused:
        writer.bind_teacher(TEACHER_B)
    assert snapshot(tmp_path) == before, "a refused writer leaves no manifest"
    writer = TeacherCacheWriter(tmp_path, k=8, writer_id="scorer-a")
    example_id, prompt, response = rollout(7)
    writer.add(example_id, prompt, response, scores(7, len(response)))
    with pytest.raises(TeacherFingerprintError, match=r"'scorer-a' does not know its teacher.*pass teacher="):
        writer.flush()
    with pytest.raises(TeacherCacheError, match=r"is of top_k=16 float16 scores; writer 'scorer-a' writes k=8"):
        writer.bind_teacher(fake_teacher("a", k=16))
    writer.bind_teacher(TEACHER_A)
    writer.close()
    assert len(TeacherCache(tmp_path)) == 3
    before = snapshot(tmp_path)
    # its own writer id again, another teacher
    with TeacherCacheWriter(tmp_path, k=8, writer_id="scorer-a") as writer, pytest.raises(TeacherFingerprintError):
        writer.bind_teacher(TEACHER_B)
    assert snapshot(tmp_path) == before, "its manifest is not rewritten (without the teacher it names)"


def test_a_cache_from_before_the_fingerprint_is_refused_unless_it_holds_no_scores(tmp_path):
    old = tmp_path / "old"
    write(old, range(2))  # a writer without a teacher writes as vlm_post did before the fingerprint
    assert TeacherCache(old).teacher is None
    before = snapshot(old)
    with pytest.raises(TeacherFingerprintError, match=r"old holds 2 scored responses but no teacher fingerprint"):
        TeacherCacheWriter(old, k=8, teacher=TEACHER_A)
    assert snapshot(old) == before
    assert rescore_dir(old, TEACHER_A) == namespace_dir(old, TEACHER_A) == old / f"teacher-{TEACHER_A.short}"
    empty = tmp_path / "empty"  # a writer from before that added nothing left a manifest without shards
    empty.mkdir()
    manifest = json.loads((old / "manifest-main.json").read_text())
    (empty / "manifest-main.json").write_text(json.dumps({**manifest, "entries": 0, "tokens": 0, "shards": []}))
    assert rescore_dir(empty, TEACHER_A) == empty
    write(empty, range(2), teacher=TEACHER_A, writer_id="rank0")  # claimed: nothing in it was scored by another
    assert TeacherCache(empty).teacher == TEACHER_A and len(TeacherCache(empty)) == 2


def test_rescoring_uses_the_cache_of_the_same_teacher_and_a_namespace_for_another(tmp_path):
    assert rescore_dir(tmp_path / "new", TEACHER_B) == tmp_path / "new"
    write(tmp_path, range(2), teacher=TEACHER_A)
    assert rescore_dir(tmp_path, TEACHER_A) == tmp_path
    namespace = rescore_dir(tmp_path, TEACHER_B)
    assert namespace == tmp_path / f"teacher-{TEACHER_B.short}"
    write(namespace, range(2), teacher=TEACHER_B)
    assert TeacherCache(namespace).teacher == TEACHER_B and TeacherCache(tmp_path).teacher == TEACHER_A
    assert len(TeacherCache(tmp_path)) == 2  # the root reads its own manifests, not the namespace's


def test_a_manifest_of_another_teacher_copied_in_is_refused(tmp_path):
    write(tmp_path / "a", range(2), teacher=TEACHER_A)
    write(tmp_path / "b", range(2, 4), teacher=TEACHER_B, writer_id="other")
    for path in (tmp_path / "b").glob("other*"):
        shutil.copy(path, tmp_path / "a")
    shutil.copy(tmp_path / "b" / "manifest-other.json", tmp_path / "a")
    with pytest.raises(
        TeacherFingerprintError,
        match=rf"manifest-other.json names teacher {TEACHER_B.short}, but "
        rf".*teacher.json records {TEACHER_A.short}: the cache mixes",
    ):
        TeacherCache(tmp_path / "a")


def test_a_corrupt_teacher_record_is_refused(tmp_path):
    write(tmp_path, range(1), teacher=TEACHER_A)
    record = json.loads((tmp_path / "teacher.json").read_text())
    (tmp_path / "teacher.json").write_text(json.dumps({**record, "weights": TEACHER_B.weights}))
    with pytest.raises(TeacherCacheError, match=r"teacher.json is corrupt: its fingerprint '\w+' is not the sha256"):
        TeacherCache(tmp_path)
    (tmp_path / "teacher.json").write_text("{")
    with pytest.raises(TeacherCacheError, match=r"teacher.json is corrupt"):
        read_cache_teacher(tmp_path)


def _claiming_process(cache_dir: str, name: str, barrier, results) -> None:
    barrier.wait()
    try:
        write(cache_dir, [0 if name == "a" else 1], teacher=fake_teacher(name), writer_id=name)
        results.put((name, "wrote"))
    except TeacherFingerprintError:
        results.put((name, "refused"))


def test_of_two_teachers_racing_on_a_new_cache_one_claims_it(tmp_path):
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_claiming_process, args=(str(tmp_path), name, barrier, results)) for name in "ab"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    outcome = dict(results.get(timeout=5) for _ in procs)
    assert sorted(outcome.values()) == ["refused", "wrote"], outcome
    winner = next(name for name, result in outcome.items() if result == "wrote")
    cache = TeacherCache(tmp_path)
    assert cache.teacher == fake_teacher(winner) and len(cache) == 1
    assert [p.name for p in tmp_path.glob("manifest-*.json")] == [f"manifest-{winner}.json"]
