"""Write the bundled sample WebDataset shards (see mlmfilter.demo.data) to a folder.

python scripts/make_sample_data.py OUTPUT_DIR [--samples-per-shard 8]
"""

from __future__ import annotations

import argparse

from mlmfilter.demo.data import make_sample_shards


def main() -> None:
    parser = argparse.ArgumentParser(description="Write the bundled sample WebDataset shards.")
    parser.add_argument("output_dir", help="folder to write 00000.tar, 00001.tar ... into")
    parser.add_argument("--samples-per-shard", type=int, default=8)
    args = parser.parse_args()
    for path in make_sample_shards(args.output_dir, samples_per_shard=args.samples_per_shard):
        print(path)


if __name__ == "__main__":
    main()
