"""Write the synthetic demo data set (Geometry3K column layout) as train/validation/test parquet files.

.venv/bin/python tools/make_demo_data.py --out artifacts/demo-data [--train 2000 --validation 200 --test 200]
"""

from __future__ import annotations

import argparse

from vlm_post.data.synthetic import write_demo_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="artifacts/demo-data")
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--validation", type=int, default=200)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = write_demo_dataset(args.out, args.train, args.validation, args.test, args.seed)
    print(f"demo data written to {out}")


if __name__ == "__main__":
    main()
