"""Prepare the data: the embedded synthetic RefCOCO, or a conversion of the real RefCOCO (UNC).

    python data_prep.py synthetic --out data/synthref [--seed 0 --images 1200 --size 128]
        → raw RefCOCO layout in data/synthref/, converted split files in data/synthref/processed/ (the data root)
    python data_prep.py refcoco --refer-dir refer/data/refcoco --coco-images coco/train2014 \
        [--mdetr-dir mdetr_annotations] --out data/refcoco/processed
        → {train,val,testA,testB}.json, detection.json, vocab.txt; without --mdetr-dir every positive span is the
          whole expression (see minidiffprompt/data/refcoco.py)
"""
import argparse
import sys
import time
from pathlib import Path

from minidiffprompt.data.refcoco import DataError, convert_refcoco
from minidiffprompt.data.synthetic import ensure_synthetic


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    syn = sub.add_parser("synthetic", help="generate the synthetic RefCOCO-format set and convert it")
    syn.add_argument("--out", type=Path, default=Path("data/synthref"))
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--images", type=int, default=1200, help="number of images (at least 1)")
    syn.add_argument("--size", type=int, default=128, help="image side in pixels (at least 32)")
    syn.add_argument("--force", action="store_true", help="regenerate even if DIR/processed exists")
    ref = sub.add_parser("refcoco", help="convert the real RefCOCO (UNC) files")
    ref.add_argument("--refer-dir", type=Path, required=True, help="folder with refs(unc).p and instances.json")
    ref.add_argument("--coco-images", type=Path, required=True, help="COCO train2014 image folder")
    ref.add_argument("--mdetr-dir", type=Path, default=None, help="folder with finetune_refcoco_{split}.json")
    ref.add_argument("--out", type=Path, required=True, help="data root to write")
    ref.add_argument("--max-bad-fraction", type=float, default=0.01,
                     help="share of refs that may be bad and dropped, in [0, 1] (default 0.01)")
    ref.add_argument("--check-images", choices=("open", "full", "none"), default="full",
                     help="full: decode every image (default); open: read headers only; none: trust the files")
    args = parser.parse_args(argv)

    t0 = time.time()
    try:
        if args.command == "synthetic":
            root = ensure_synthetic(args.out, seed=args.seed, images=args.images, size=args.size, force=args.force)
            print(f"data root: {root}")
        else:
            convert_refcoco(args.refer_dir, args.coco_images, args.out, mdetr_dir=args.mdetr_dir,
                            max_bad_fraction=args.max_bad_fraction, check_images=args.check_images)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"done in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
