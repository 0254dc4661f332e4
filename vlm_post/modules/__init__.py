from vlm_post.modules.base import OptimConfig, PolicyModule
from vlm_post.modules.distill import DistillLossConfig, DistillModule, TeacherConfig
from vlm_post.modules.evaluation import EvalConfig
from vlm_post.modules.on_policy import OnPolicyModule
from vlm_post.modules.rl import RLModule
from vlm_post.modules.sft import SFTModule

__all__ = [
    "DistillLossConfig",
    "DistillModule",
    "EvalConfig",
    "OnPolicyModule",
    "OptimConfig",
    "PolicyModule",
    "RLModule",
    "SFTModule",
    "TeacherConfig",
]
