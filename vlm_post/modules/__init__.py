from vlm_post.modules.base import OptimConfig, PolicyModule
from vlm_post.modules.evaluation import EvalConfig
from vlm_post.modules.rl import RLModule
from vlm_post.modules.sft import SFTModule

__all__ = ["EvalConfig", "OptimConfig", "PolicyModule", "RLModule", "SFTModule"]
