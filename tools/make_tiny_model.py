"""Build the tiny random-init Qwen2.5-VL (model + processor, HF format) offline.

.venv/bin/python tools/make_tiny_model.py --out artifacts/tiny-qwen2.5-vl [--hidden-size 128 --layers 2]
"""

from __future__ import annotations

import argparse

from vlm_post.models.tiny import build_tiny_qwen2_5_vl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="artifacts/tiny-qwen2.5-vl")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args()
    out = build_tiny_qwen2_5_vl(args.out, seed=args.seed, hidden_size=args.hidden_size, num_layers=args.layers)
    print(f"tiny Qwen2.5-VL written to {out}")


if __name__ == "__main__":
    main()
