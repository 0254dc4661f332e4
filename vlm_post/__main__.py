"""``python -m vlm_post``: the ``vlm_post`` command (the study launchers start stages this way)."""

from vlm_post.cli import main

main()
