#!/usr/bin/env python
"""Draw the part-to-whole hierarchy CAST finds in one image: a column per level (superpixels, then levels 1..4),
region boundaries over the image on top, the regions' mean colours below.

    python examples/segment_image.py photo.jpg --model path/to/cast_model --out hierarchy.png

`--model` is a `save_pretrained` folder of any CAST model (its `preprocessor_config.json` is used when present,
otherwise the default `CastImageProcessor`). The picture shows the image as the model saw it (resized and centre
cropped; `--whole_image` resizes the whole picture to the crop size instead).
"""

import argparse

import PIL.Image
import torch

from hf_hierseg.image_processing_cast import CastImageProcessor
from hf_hierseg.loading import load_cast_image_processor, load_cast_model
from hf_hierseg.superpixels import denormalize_to_uint8
from hf_hierseg.visualization import draw_hierarchy


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image", help="image file")
    parser.add_argument("--model", required=True, help="folder with a CAST model (save_pretrained)")
    parser.add_argument("--out", default="hierarchy.png", help="output PNG")
    parser.add_argument("--whole_image", action="store_true", help="resize the whole image instead of cropping")
    parser.add_argument("--cell_size", type=int, default=224, help="height of each picture in the grid")
    args = parser.parse_args(argv)

    model = load_cast_model(args.model)
    processor = load_cast_image_processor(args.model) or CastImageProcessor()
    options = {}
    if args.whole_image:
        options = {"size": dict(processor.crop_size), "do_center_crop": False}
    inputs = processor(PIL.Image.open(args.image), return_tensors="pt", **options)
    with torch.no_grad():
        outputs = model(**inputs)
    level_maps = processor.post_process_hierarchical_segmentation(outputs, inputs["superpixels"])[0]
    image = denormalize_to_uint8(inputs["pixel_values"][0], processor.image_mean, processor.image_std)
    draw_hierarchy(image, level_maps, cell_size=args.cell_size).save(args.out)
    print(f"Saved {args.out}")


if __name__ == "__main__":
    main()
