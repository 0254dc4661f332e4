from vlm_post.modules.base import EvalConfig, OptimConfig, PolicyModule
from vlm_post.modules.sft import SFTModule

__all__ = ["EvalConfig", "OptimConfig", "PolicyModule", "SFTModule"]
