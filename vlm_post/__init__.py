"""vlm_post: post-training of vision-language models (SFT, on-policy distillation, GRPO) on Lightning."""

__version__ = "0.1.0"
