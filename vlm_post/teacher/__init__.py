"""Teacher scores for on-policy distillation: the teacher that scores the student's tokens, and the on-disk
cache it writes and the student reads."""

from vlm_post.teacher.cache import TeacherBatch, TeacherCache, pad_scores
from vlm_post.teacher.cache_format import (
    DEFAULT_SHARD_TOKENS,
    FORMAT,
    VERSION,
    TeacherCacheError,
    TeacherCacheMismatchError,
    TeacherFingerprintError,
    TeacherScores,
    check_cache_teacher,
    entry_key,
    namespace_dir,
    read_cache_teacher,
    rescore_dir,
)
from vlm_post.teacher.cache_writer import TeacherCacheWriter
from vlm_post.teacher.fingerprint import TeacherFingerprint, fingerprint_teacher
from vlm_post.teacher.scoring import HFTeacher, check_teacher_compatible
from vlm_post.teacher.source import TeacherScoreSource, row_keys

__all__ = [
    "DEFAULT_SHARD_TOKENS",
    "FORMAT",
    "VERSION",
    "HFTeacher",
    "TeacherBatch",
    "TeacherCache",
    "TeacherCacheError",
    "TeacherCacheMismatchError",
    "TeacherCacheWriter",
    "TeacherFingerprint",
    "TeacherFingerprintError",
    "TeacherScoreSource",
    "TeacherScores",
    "check_cache_teacher",
    "check_teacher_compatible",
    "entry_key",
    "fingerprint_teacher",
    "namespace_dir",
    "pad_scores",
    "read_cache_teacher",
    "rescore_dir",
    "row_keys",
]
