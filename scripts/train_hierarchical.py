#!/usr/bin/env python
"""Hierarchical classification with H-CAST (a CAST level per taxonomy level, tree-path KL loss, Mixup / CutMix with
one lambda for all levels), on 1 or N processes:

    accelerate launch scripts/train_hierarchical.py --dataset_name ./birds --label_column_name species \
        --taxonomy birds_taxonomy.json --model_name_or_path cast-small-deit --output_dir hcast-birds \
        --per_device_train_batch_size 64 --num_train_epochs 100 --num_warmup_steps 500

Same Accelerate machinery, arguments and `--resume_from_checkpoint latest` as scripts/train_supervised.py; see
`--help` for all options.
"""

from hf_hierseg.training.hierarchical import hierarchical_parser, train_hierarchical


def main(argv=None):
    train_hierarchical(*hierarchical_parser().parse_args_into_dataclasses(args=argv))


if __name__ == "__main__":
    main()
