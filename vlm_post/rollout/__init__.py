from vlm_post.rollout.base import RolloutEngine, Rollouts, SamplingParams
from vlm_post.rollout.batch import ModelRows, RolloutBatch
from vlm_post.rollout.hf import HFGenerateEngine

__all__ = ["HFGenerateEngine", "ModelRows", "RolloutBatch", "RolloutEngine", "Rollouts", "SamplingParams"]
