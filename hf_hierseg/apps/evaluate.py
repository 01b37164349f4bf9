"""`hf-hierseg evaluate segmentation | classification | open-vocabulary | segment-retrieval`: the evaluations of
`hf_hierseg.evaluation` from the command line (also `scripts/evaluate_segmentation.py`,
`scripts/evaluate_classification.py`, `scripts/evaluate_open_vocabulary.py` and
`scripts/evaluate_segment_retrieval.py`).

Each evaluation has a parser factory (`segmentation_parser`, `classification_parser`, `open_vocabulary_parser`,
`segment_retrieval_parser`) and a runner taking the parsed arguments (`run_segmentation`, `run_classification`,
`run_open_vocabulary`, `run_segment_retrieval`); `hf_hierseg.cli` and the scripts pair them.
"""

import argparse
import logging

from ..evaluation.classification_eval import format_classification_table, run_classification_evaluation
from ..evaluation.open_vocabulary import (
    PAPER_CLIP_MODEL,
    PAPER_IMAGE_SIZE,
    format_open_vocabulary_report,
    run_open_vocabulary_evaluation,
)
from ..evaluation.segment_retrieval import (
    CAST_EMBEDDINGS,
    PAPER_LEVEL,
    PAPER_TOP_K,
    VIEW_GEOMETRIES,
    VIT_EMBEDDINGS,
    format_segment_retrieval_report,
    run_segment_retrieval_evaluation,
)
from ..evaluation.segmentation_eval import (
    VIT_BASELINE_PATCH_SIZE,
    format_segmentation_report,
    run_segmentation_evaluation,
    write_json,
)


SEGMENTATION_DESCRIPTION = """\
Part-whole segmentation of CAST's hierarchy (levels 1..4) against ground-truth masks, beside the paper's ViT
baseline (patch tokens upsampled, spherical k-means into as many clusters as CAST keeps, then hierarchical k-means):
per level, mIoU after majority-label assignment, best-overlap IoU, covering and boundary F-score.

    hf-hierseg evaluate segmentation --model_name_or_path outputs/reproduce_small/cast \\
        --dataset_name outputs/reproduce_small/data --mask_column object_mask \\
        --vit_model outputs/reproduce_small/vit --real_photos voc --output_json outputs/segmentation.json

The dataset is a folder written by `scripts/make_synthetic_dataset.py`, any imagefolder / parquet folder with an
image column and a mask column (class ids as palette indices or grayscale values), or a Hub id. Without
`--vit_model` the baseline ViT has random weights (a warning says so).
"""

CLASSIFICATION_DESCRIPTION = """\
Classification accuracy of a CAST model on a labelled dataset: top-1 / top-5 of a classifier's logits, and the
weighted kNN accuracy (k = 20, temperature 0.07, as DINO / MoCo v3) of the pooled embedding of any CAST model, with
the training split as neighbours.

    hf-hierseg evaluate classification --model_name_or_path outputs/reproduce_small/cast \\
        --dataset_name outputs/reproduce_small/data --eval_split test --output_json outputs/classification.json

The dataset is a folder written by `scripts/make_synthetic_dataset.py`, any imagefolder / parquet folder with an
image column and a label column, or a Hub id.
"""


def evaluation_parser(description):
    """An evaluation's argument parser; `description` (usage examples included) is printed as written."""
    return argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_superpixel_arguments(parser):
    """--superpixel_method, --num_superpixels and --seeds_recipe (default: the model's image processor's)."""
    parser.add_argument(
        "--superpixel_method",
        choices=("seeds", "slic", "grid"),
        default=None,
        help="default: the model's image processor's, else seeds",
    )
    parser.add_argument(
        "--num_superpixels",
        type=int,
        default=None,
        help="superpixels per 224x224 px (default: the image processor's, else 196)",
    )
    parser.add_argument(
        "--seeds_recipe",
        choices=("self_supervised", "supervised"),
        default=None,
        help="SEEDS settings (default: the image processor's, else self_supervised)",
    )


def superpixel_options(args):
    """The keyword arguments of the evaluation functions for `add_superpixel_arguments`' arguments."""
    return {
        "superpixel_method": args.superpixel_method,
        "num_superpixels": args.num_superpixels,
        "seeds_recipe": args.seeds_recipe,
    }


def add_vit_baseline_arguments(parser):
    """--vit_model, --vit_patch_size and --no_vit: the ViT of the ViT + k-means baseline."""
    parser.add_argument("--vit_model", default=None, help="ViT folder for the baseline (default: random weights)")
    parser.add_argument(
        "--vit_patch_size",
        type=int,
        default=VIT_BASELINE_PATCH_SIZE,
        help="patch size of the random ViT (ignored with --vit_model)",
    )
    parser.add_argument("--no_vit", action="store_true", help="skip the ViT + k-means baseline")


def vit_baseline_options(args):
    """The keyword arguments of the evaluation functions for `add_vit_baseline_arguments`' arguments."""
    return {"vit_model": args.vit_model, "vit_patch_size": args.vit_patch_size, "skip_vit": args.no_vit}


def print_report(report, run, output_json=None):
    """Print an evaluation's `report` and, with `output_json`, write its `run` there. Returns 0 (the exit status)."""
    print(report)
    if output_json:
        print(f"\nScores written to {write_json(run, output_json)}")
    return 0


def segmentation_parser():
    parser = evaluation_parser(SEGMENTATION_DESCRIPTION)
    parser.add_argument("--model_name_or_path", required=True, help="CAST model folder or Hub id")
    parser.add_argument("--dataset_name", default=None, help="image + mask dataset (folder or Hub id)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--mask_column", default="object_mask")
    parser.add_argument("--image_column", default=None, help="default: the first Image column")
    parser.add_argument("--max_samples", type=int, default=None)
    parser.add_argument("--num_labels", type=int, default=None, help="classes in the masks (default: inferred)")
    parser.add_argument("--ignore_index", type=int, default=None, help="mask value left out of every score")
    parser.add_argument(
        "--exclude_labels",
        type=int,
        nargs="*",
        default=(),
        help="mask labels not scored as regions by best overlap / covering (e.g. 0 = background)",
    )
    parser.add_argument(
        "--levels", type=int, nargs="+", default=(1, 2, 3, 4), help="CAST levels (0 = superpixels, 1..4 = hierarchy)"
    )
    parser.add_argument("--tolerance", type=float, default=1, help="boundary matching distance in pixels")
    parser.add_argument(
        "--real_photos",
        nargs="*",
        default=(),
        choices=("voc", "arc2017"),
        help="also evaluate real photos shipped by PyPI packages (class and instance masks)",
    )
    add_vit_baseline_arguments(parser)
    parser.add_argument(
        "--vit_max_fit_pixels",
        type=int,
        default=4096,
        help="k-means is fitted on the ViT features upsampled to at most this many pixels",
    )
    add_superpixel_arguments(parser)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="k-means seed (and random ViT initialisation)")
    parser.add_argument("--output_json", default=None, help="write the settings and every score here")
    return parser


def run_segmentation(args):
    """Run `segmentation_parser`'s arguments: print the report (and write --output_json). Returns 0."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    run = run_segmentation_evaluation(
        args.model_name_or_path,
        args.dataset_name,
        split=args.split,
        mask_column=args.mask_column,
        image_column=args.image_column,
        max_samples=args.max_samples,
        num_labels=args.num_labels,
        levels=tuple(args.levels),
        **vit_baseline_options(args),
        vit_max_fit_pixels=args.vit_max_fit_pixels,
        real_photos=tuple(args.real_photos),
        **superpixel_options(args),
        batch_size=args.batch_size,
        ignore_index=args.ignore_index,
        tolerance=args.tolerance,
        exclude_labels=tuple(args.exclude_labels),
        seed=args.seed,
    )
    return print_report(format_segmentation_report(run), run, args.output_json)


def classification_parser():
    parser = evaluation_parser(CLASSIFICATION_DESCRIPTION)
    parser.add_argument("--model_name_or_path", required=True, help="CAST model folder or Hub id")
    parser.add_argument("--dataset_name", required=True, help="labelled image dataset (folder or Hub id)")
    parser.add_argument("--eval_split", default="test")
    parser.add_argument("--train_split", default="train", help="neighbours of the kNN classifier")
    parser.add_argument("--no_knn", action="store_true", help="skip the kNN accuracy")
    parser.add_argument("--image_column", default=None, help="default: the first Image column")
    parser.add_argument("--label_column", default=None, help="default: the first ClassLabel column")
    parser.add_argument("--max_eval_samples", type=int, default=None)
    parser.add_argument("--max_train_samples", type=int, default=None)
    parser.add_argument("--image_size", type=int, default=None, help="default: the model's")
    parser.add_argument("--crop_fraction", type=float, default=0.875, help="central crop of the evaluation view")
    parser.add_argument("--knn_k", type=int, default=20)
    parser.add_argument("--knn_temperature", type=float, default=0.07)
    add_superpixel_arguments(parser)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--output_json", default=None, help="write the settings and the scores here")
    return parser


def run_classification(args):
    """Run `classification_parser`'s arguments: print the table (and write --output_json). Returns 0."""
    run = run_classification_evaluation(
        args.model_name_or_path,
        args.dataset_name,
        eval_split=args.eval_split,
        train_split=args.train_split,
        knn=not args.no_knn,
        image_column=args.image_column,
        label_column=args.label_column,
        **superpixel_options(args),
        image_size=args.image_size,
        crop_fraction=args.crop_fraction,
        knn_k=args.knn_k,
        knn_temperature=args.knn_temperature,
        batch_size=args.batch_size,
        max_eval_samples=args.max_eval_samples,
        max_train_samples=args.max_train_samples,
    )
    table = format_classification_table({args.model_name_or_path: run["results"]})
    return print_report(f"**{args.dataset_name} [{args.eval_split}]**\n\n{table}", run, args.output_json)


OPEN_VOCABULARY_DESCRIPTION = """\
Open-vocabulary object and part segmentation, the paper's PartImageNet protocol: CAST's level-4 segments (objects)
and level-3 segments (parts), each shown alone to CLIP (pixels outside set to 0.5 after CLIP's normalisation) and
matched to "a photo of a {name}" (objects + Background; a part only against its object's parts), on the 224 x 224
centre crop; per-image Jaccard (torchmetrics' macro average) averaged over images, and the dataset-level mIoU.
Baselines: ViT + k-means (--vit_model) and SAM masks (--sam_model, transformers' mask-generation pipeline).

    hf-hierseg evaluate open-vocabulary --model_name_or_path converted/cast_base \\
        --annotation_file data/PartImageNet/annotations/val.json --image_root data/PartImageNet/images/val \\
        --clip_model openai/clip-vit-base-patch16 --device cuda --results_file outputs/ov_val.jsonl

The paper reports CAST-B 29.67 object / 13.21 part mIoU. A `datasets` dataset with object and part mask columns
works too (--dataset_name, --object_names, --part_names; a folder of scripts/make_synthetic_dataset.py names its
own). --results_file keeps one line per scored image: a killed run resumes from it.
"""


def open_vocabulary_parser():
    parser = evaluation_parser(OPEN_VOCABULARY_DESCRIPTION)
    parser.add_argument("--model_name_or_path", default=None, help="CAST model folder or Hub id (default: bundled)")
    parser.add_argument("--no_cast", action="store_true", help="evaluate only the baselines")
    parser.add_argument("--clip_model", default=PAPER_CLIP_MODEL, help="CLIP / SigLIP model (Hub id or folder)")
    data = parser.add_argument_group("data: a COCO-style JSON of part polygons (PartImageNet) or a datasets dataset")
    data.add_argument("--annotation_file", default=None, help="COCO-style JSON (e.g. PartImageNet val.json)")
    data.add_argument("--image_root", default=None, help="folder of its images (file_name or <wnid>/file_name)")
    data.add_argument("--dataset_name", default=None, help="a datasets dataset with object and part mask columns")
    data.add_argument("--split", default="validation")
    data.add_argument("--image_column", default=None, help="default: the first Image column")
    data.add_argument("--object_column", default="object_mask")
    data.add_argument("--part_column", default="part_mask")
    data.add_argument("--object_names", nargs="+", default=None, help="names of the object mask values 0, 1, ...")
    data.add_argument("--part_names", nargs="+", default=None, help="names of the part mask values 0, 1, ...")
    data.add_argument("--object_background", type=int, default=0, help="object mask value of the background")
    data.add_argument("--part_background", type=int, default=0, help="part mask value of the background")
    data.add_argument("--max_samples", type=int, default=None)
    parser.add_argument("--object_level", type=int, default=4, help="CAST level of the objects")
    parser.add_argument("--part_level", type=int, default=3, help="CAST level of the parts")
    parser.add_argument("--vit_model", default=None, help="ViT folder / Hub id: adds the ViT + k-means baseline")
    parser.add_argument("--vit_max_fit_pixels", type=int, default=4096)
    parser.add_argument("--sam_model", default=None, help="SAM Hub id / folder (e.g. facebook/sam-vit-huge)")
    parser.add_argument("--sam_points_per_batch", type=int, default=64)
    parser.add_argument("--hypothesis_template", default="a photo of a {}")
    parser.add_argument("--masking", choices=("fill", "crop", "blur"), default="fill", help="default: the paper's")
    parser.add_argument("--fill_value", type=float, default=0.5, help="outside pixels, after CLIP's normalisation")
    parser.add_argument("--blur_sigma", type=float, default=8.0, help="--masking blur: Gaussian sigma in pixels")
    parser.add_argument("--segment_batch_size", type=int, default=32, help="segment views per CLIP call")
    parser.add_argument("--image_size", type=int, default=PAPER_IMAGE_SIZE, help="side of the centre crop")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0, help="k-means seed")
    parser.add_argument("--results_file", default=None, help="JSON lines, one per image and model (resumable)")
    parser.add_argument("--output_json", default=None, help="write the settings and the summary here")
    return parser


def run_open_vocabulary(args):
    """Run `open_vocabulary_parser`'s arguments: print the report (and write --output_json). Returns 0."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    run = run_open_vocabulary_evaluation(
        args.model_name_or_path,
        args.clip_model,
        annotation_file=args.annotation_file,
        image_root=args.image_root,
        dataset_name=args.dataset_name,
        split=args.split,
        image_column=args.image_column,
        object_column=args.object_column,
        part_column=args.part_column,
        object_names=args.object_names,
        part_names=args.part_names,
        object_background=args.object_background,
        part_background=args.part_background,
        max_samples=args.max_samples,
        object_level=args.object_level,
        part_level=args.part_level,
        skip_cast=args.no_cast,
        vit_model=args.vit_model,
        vit_max_fit_pixels=args.vit_max_fit_pixels,
        sam_model=args.sam_model,
        sam_points_per_batch=args.sam_points_per_batch,
        hypothesis_template=args.hypothesis_template,
        masking=args.masking,
        fill_value=args.fill_value,
        blur_sigma=args.blur_sigma,
        segment_batch_size=args.segment_batch_size,
        image_size=args.image_size,
        device=args.device,
        results_file=args.results_file,
        seed=args.seed,
    )
    return print_report(format_open_vocabulary_report(run["summary"]), run, args.output_json)


SEGMENT_RETRIEVAL_DESCRIPTION = """\
Unsupervised semantic segmentation by nearest-neighbour retrieval, the authors' VOC protocol (scripts/spml/nn_cast.sh
of twke18/CAST): CAST's segments of a level (default 4) with their prototypes (normalised sum of the pixels'
normalised segment embeddings) form, over the memory split's images, a memory labelled by each segment's majority
mask label; every segment of the query split takes the majority label of its 20 most similar memory segments; mIoU
over the query masks (confusion summed over the dataset), beside the ViT + k-means baseline with the same retrieval
and the floor of labelling every pixel with the most frequent label.

    hf-hierseg evaluate segment-retrieval --model_name_or_path outputs/part_whole_small/cast_moco_seed0 \\
        --dataset_name outputs/part_whole_small/data --levels 1 2 3 4 \\
        --vit_model outputs/part_whole_small/vit_moco_seed0 --output_json outputs/retrieval.json

The authors' VOC setting: a converted MoCo `cast_seg` checkpoint (its BlockFusion + projector give the `fused`
embeddings), `--dataset_name` a VOC dataset with image and class-mask columns (`--memory_split train`,
`--query_split validation`), `--ignore_index 255 --num_labels 21 --geometry longest_edge --image_size 512
--num_superpixels 262` (the authors' 1024 SEEDS superpixels on a ~500 x 375 image). Paper: 38.4 mIoU (CAST-S).
"""


def segment_retrieval_parser():
    parser = evaluation_parser(SEGMENT_RETRIEVAL_DESCRIPTION)
    parser.add_argument("--model_name_or_path", required=True, help="CAST model folder or Hub id")
    parser.add_argument("--dataset_name", required=True, help="image + mask dataset (folder or Hub id)")
    parser.add_argument("--memory_split", default="train", help="split whose segments form the memory")
    parser.add_argument("--query_split", default="test", help="split whose segments are labelled and scored")
    parser.add_argument("--mask_column", default="object_mask")
    parser.add_argument("--image_column", default=None, help="default: the first Image column")
    parser.add_argument("--max_memory_samples", type=int, default=None)
    parser.add_argument("--max_query_samples", type=int, default=None)
    parser.add_argument("--num_labels", type=int, default=None, help="classes in the masks (default: inferred)")
    parser.add_argument("--ignore_index", type=int, default=None, help="mask value that is not a class (VOC: 255)")
    parser.add_argument(
        "--levels", type=int, nargs="+", default=(PAPER_LEVEL,), help="CAST levels whose segments are retrieved"
    )
    parser.add_argument("--top_k", type=int, default=PAPER_TOP_K, help="nearest memory segments that vote")
    parser.add_argument(
        "--embedding",
        choices=CAST_EMBEDDINGS,
        default=None,
        help="CAST segment embedding (default: fused for a segmentation model, else levels)",
    )
    parser.add_argument("--image_size", type=int, default=None, help="view size (default: the model's image size)")
    parser.add_argument(
        "--geometry",
        choices=VIEW_GEOMETRIES,
        default="square",
        help="square views, or the longer side --image_size with the aspect kept (the authors')",
    )
    add_vit_baseline_arguments(parser)
    parser.add_argument("--vit_embedding", choices=VIT_EMBEDDINGS, default="levels", help="ViT segment embedding")
    parser.add_argument("--vit_max_fit_pixels", type=int, default=4096)
    add_superpixel_arguments(parser)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="k-means seed (and random ViT initialisation)")
    parser.add_argument("--output_json", default=None, help="write the settings and every score here")
    return parser


def run_segment_retrieval(args):
    """Run `segment_retrieval_parser`'s arguments: print the report (and write --output_json). Returns 0."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    run = run_segment_retrieval_evaluation(
        args.model_name_or_path,
        args.dataset_name,
        memory_split=args.memory_split,
        query_split=args.query_split,
        mask_column=args.mask_column,
        image_column=args.image_column,
        max_memory_samples=args.max_memory_samples,
        max_query_samples=args.max_query_samples,
        num_labels=args.num_labels,
        ignore_index=args.ignore_index,
        levels=tuple(args.levels),
        top_k=args.top_k,
        embedding=args.embedding,
        image_size=args.image_size,
        geometry=args.geometry,
        **vit_baseline_options(args),
        vit_embedding=args.vit_embedding,
        vit_max_fit_pixels=args.vit_max_fit_pixels,
        **superpixel_options(args),
        batch_size=args.batch_size,
        seed=args.seed,
    )
    return print_report(format_segment_retrieval_report(run), run, args.output_json)


EVALUATIONS = {
    "segmentation": (segmentation_parser, run_segmentation),
    "classification": (classification_parser, run_classification),
    "open_vocabulary": (open_vocabulary_parser, run_open_vocabulary),
    "segment_retrieval": (segment_retrieval_parser, run_segment_retrieval),
}


def main(kind, argv=None):
    """Parse `argv` for the evaluation `kind` ("segmentation", "classification", "open_vocabulary" or
    "segment_retrieval") and run it."""
    parser_factory, runner = EVALUATIONS[kind]
    return runner(parser_factory().parse_args(argv))
