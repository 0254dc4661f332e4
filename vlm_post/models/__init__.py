from vlm_post.models.export import export_hf
from vlm_post.models.loading import freeze_vision, load_policy, load_processor, resolve_model_path

__all__ = ["export_hf", "freeze_vision", "load_policy", "load_processor", "resolve_model_path"]
