"""`hf-hierseg evaluate hierarchical`: H-CAST's evaluation of a hierarchical classifier from the command line (also
`scripts/evaluate_hierarchical.py`): per-level top-1, full-path accuracy and tree consistency (TICE)."""

from ..evaluation.hierarchical_eval import format_hierarchical_table, run_hierarchical_evaluation
from .evaluate import add_superpixel_arguments, evaluation_parser, print_report, superpixel_options


DESCRIPTION = """\
Hierarchical classification of a labelled dataset by a CastForHierarchicalImageClassification (H-CAST) model: top-1
accuracy of every taxonomy level, full-path accuracy (every level right) and tree consistency (the predicted labels
form a path of the model's taxonomy; TICE = 1 - consistency).

    hf-hierseg evaluate hierarchical --model_name_or_path outputs/hcast --dataset_name outputs/shapes \\
        --split test --output_json outputs/hierarchical.json

Labels per level come from --label_columns (one column per level, finest first) or from the finest label alone
(--label_column, default: the first ClassLabel column), the coarser ones derived through the model's taxonomy.
"""


def hierarchical_parser():
    parser = evaluation_parser(DESCRIPTION)
    parser.add_argument("--model_name_or_path", required=True, help="H-CAST model folder or Hub id")
    parser.add_argument("--dataset_name", required=True, help="labelled image dataset (folder or Hub id)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--image_column", default=None, help="default: the first Image column")
    parser.add_argument("--label_column", default=None, help="finest label (default: the first ClassLabel column)")
    parser.add_argument("--label_columns", nargs="+", default=None, help="one label column per level, finest first")
    parser.add_argument("--max_samples", type=int, default=None)
    parser.add_argument("--image_size", type=int, default=None, help="default: the model's")
    parser.add_argument("--crop_fraction", type=float, default=0.875, help="central crop of the evaluation view")
    add_superpixel_arguments(parser)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output_json", default=None, help="write the settings and the scores here")
    return parser


def run_hierarchical(args):
    """Run `hierarchical_parser`'s arguments: print the table (and write --output_json). Returns 0."""
    run = run_hierarchical_evaluation(
        args.model_name_or_path,
        args.dataset_name,
        split=args.split,
        image_column=args.image_column,
        label_column=args.label_column,
        label_columns=args.label_columns,
        **superpixel_options(args),
        image_size=args.image_size,
        crop_fraction=args.crop_fraction,
        batch_size=args.batch_size,
        max_samples=args.max_samples,
        device=args.device,
    )
    table = format_hierarchical_table({args.model_name_or_path: run["results"]}, run["results"]["level_names"])
    return print_report(f"**{args.dataset_name} [{args.split}]**\n\n{table}", run, args.output_json)


__all__ = ["hierarchical_parser", "run_hierarchical"]
