"""Score the student's rollout files with a teacher, into the teacher-logit cache (a separate process).

For on-policy distillation from a teacher too large to share the student's GPUs (the study's 72B):
train with ``model.teacher.model_name_or_path: null`` and a ``cache_dir``; each step writes the responses
the cache lacks to ``<cache_dir>/rollouts/`` and waits (``model.teacher.wait_s``) while this tool, on other
GPUs or nodes, scores them:

    python tools/score_teacher.py --config configs/geo3k/opd_qwen2_5_vl_7b_from_72b.yaml \\
        --teacher Qwen/Qwen2.5-VL-72B-Instruct --device cuda --dtype bfloat16 --follow

It reads the data and cache settings from the student's config, so it rebuilds the student's exact prompts
(and refuses a prompt whose token ids differ). Give each concurrent scorer its own ``--writer-id``.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

from vlm_post.errors import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the student's `vlm_post fit` config (a DistillModule)")
    parser.add_argument(
        "--teacher", default=None, help="teacher model (default: model.init_args.teacher.model_name_or_path)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--batch-rows", type=int, default=8, help="responses per teacher forward pass")
    parser.add_argument("--writer-id", default=f"scorer-{socket.gethostname()}-{os.getpid()}")
    parser.add_argument("--follow", action="store_true", help="keep scoring new rollout files until interrupted")
    args = parser.parse_args(argv)

    from vlm_post.models.loading import load_processor, resolve_model_path
    from vlm_post.teacher import HFTeacher, TeacherCacheWriter
    from vlm_post.teacher.external import RolloutScorer, load_fit_config

    try:
        data, settings, student = load_fit_config(args.config)
        teacher_path = args.teacher or settings.get("model_name_or_path")
        if not teacher_path:
            raise ConfigError("no teacher: pass --teacher (the config's model.init_args.teacher has none)")
        top_k = int(settings.get("top_k", 32))
        teacher = HFTeacher(teacher_path, load_processor(resolve_model_path(student)), top_k, args.dtype).load(
            args.device
        )
        writer = TeacherCacheWriter(
            settings["cache_dir"], k=top_k, dtype=settings.get("cache_dtype", "float16"), writer_id=args.writer_id
        )
        with writer:
            scorer = RolloutScorer(data, teacher, writer, batch_rows=args.batch_rows)
            total = scorer.run(settings["cache_dir"], follow=args.follow)
    except ConfigError as err:
        print(f"score_teacher: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    print(f"score_teacher: {total} new responses scored into {settings['cache_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
