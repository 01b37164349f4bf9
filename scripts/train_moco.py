#!/usr/bin/env python
"""Self-supervised pre-training of CAST with MoCo v3, on 1 or N processes:

    accelerate launch scripts/train_moco.py --train_dir images/ --config_name cast-small --output_dir cast-moco \
        --per_device_train_batch_size 64 --max_train_steps 10000 --num_warmup_steps 1000 --checkpointing_steps 500

Add `--resume_from_checkpoint latest` to continue after an interruption. See `--help` for all options.
"""

from hf_hierseg.training.arguments import moco_parser
from hf_hierseg.training.recipes import train_moco


def main(argv=None):
    train_moco(*moco_parser().parse_args_into_dataclasses(args=argv))


if __name__ == "__main__":
    main()
