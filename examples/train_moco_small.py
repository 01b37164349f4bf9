"""MoCo-v3 pre-training of a small CAST on a few hundred synthetic images, in a few CPU minutes.

Trains `scripts/train_moco.py`'s recipe (two asymmetric views with their own SEEDS superpixels, symmetric InfoNCE
with T = 0.2, momentum encoder on a cosine schedule, AdamW with warm-up + cosine learning rate) on the synthetic
shapes of `hf_hierseg.evaluation.synthetic`, prints the loss as it goes down, then checks on held-out images that
the learned embedding matches two augmented views of the same image far more often than the same network at
initialisation does.

    python examples/train_moco_small.py --output_dir runs/moco_small

Any argument of `scripts/train_moco.py` can be appended (e.g. `--max_train_steps 600`). Two processes:
`ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 examples/train_moco_small.py ...`.
"""

import argparse
import dataclasses
import sys
from pathlib import Path

import datasets
import torch
import torch.nn.functional as F

from hf_hierseg import CastImageProcessor, CastModel
from hf_hierseg.evaluation.synthetic import write_synthetic_dataset
from hf_hierseg.training.arguments import moco_parser
from hf_hierseg.training.augment import MOCO_VIEW_1, MOCO_VIEW_2, MocoTransform
from hf_hierseg.training.data import SuperpixelBatches, evaluation_loader
from hf_hierseg.training.loop import METRICS_FILE, read_metrics
from hf_hierseg.training.recipes import build_config, train_moco


# pooling_dropout_prob=0: the original's dropout inside graph pooling (0.1) makes the views' embeddings too noisy
# for a few hundred steps of a small model.
SMALL_CAST = [
    "hidden_size=96",
    "num_attention_heads=4",
    "depths=1,1,1,1",
    "num_clusters=32,16,8,4",
    "image_size=64",
    "projection_dim=64",
    "projection_hidden_dim=256",
    "pooling_dropout_prob=0.0",
]
NUM_SUPERPIXELS = 600  # per 224x224 pixels: 49 requested on a 64x64 view, SEEDS returns 36

RECIPE = [
    "--num_superpixels",
    str(NUM_SUPERPIXELS),
    "--per_device_train_batch_size",
    "32",
    "--learning_rate",
    "1.5e-3",
    "--weight_decay",
    "0.1",
    "--num_warmup_steps",
    "20",
    "--max_train_steps",
    "200",
    "--crop_min_scale",
    "0.2",
    "--moco_momentum",
    "0.9",  # 0.99 in the paper's long runs; a 200-step run needs a momentum encoder that keeps up
    "--logging_steps",
    "20",
    "--checkpointing_steps",
    "100",
    "--dataloader_num_workers",
    "1",
    "--report_to",
    "jsonl",
]


@torch.no_grad()
def view_retrieval_accuracy(model, split):
    """Instance retrieval on held-out images: two MoCo views of each image (fixed seed, so the same views for
    every model); the fraction of second views whose nearest first view (cosine of the CLS embeddings) comes from
    the same image. Chance: 1 / number of images."""
    views = tuple(dataclasses.replace(view, crop_scale=(0.2, 1.0)) for view in (MOCO_VIEW_1, MOCO_VIEW_2))
    transform = MocoTransform(CastImageProcessor(num_superpixels=NUM_SUPERPIXELS), 64, views=views)
    batches = SuperpixelBatches(split, transform, 60, "image", shuffle=False, drop_last=False, seed=0)
    model.eval()
    views = ([], [])
    for batch, _ in evaluation_loader(batches):
        for view, embeddings in enumerate(views):
            output = model(batch["pixel_values"][:, view], batch["superpixels"][:, view])
            embeddings.append(F.normalize(output.pooler_output, dim=-1))
    first, second = torch.cat(views[0]), torch.cat(views[1])
    return ((second @ first.t()).argmax(1) == torch.arange(len(first))).float().mean().item()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="runs/moco_small")
    parser.add_argument("--num_images", type=int, default=480, help="Training images (plus 240 held out).")
    known, extra = parser.parse_known_args()
    output_dir = Path(known.output_dir)
    data_dir = output_dir.parent / f"{output_dir.name}_data"
    if not (data_dir / "synthetic_info.json").is_file():
        write_synthetic_dataset(
            data_dir, num_images=known.num_images, num_test_images=240, image_size=64, format="parquet", seed=1
        )
    data_args, model_args, optimization_args, output_args, moco_args = moco_parser().parse_args_into_dataclasses(
        args=[
            "--dataset_name",
            str(data_dir / "data"),
            "--config_name",
            "cast-small",
            "--config_overrides",
            *SMALL_CAST,
            "--output_dir",
            str(output_dir),
            *RECIPE,
            *extra,
        ]
    )
    train_moco(data_args, model_args, optimization_args, output_args, moco_args)

    print("\nMoCo loss over training:")
    for line in read_metrics(output_dir / METRICS_FILE):
        print(
            f"  step {line['step']:4d}: loss {line['loss']:.3f}  lr {line['learning_rate']:.2e}  "
            f"momentum {line['momentum']:.4f}"
        )
    test_split = datasets.load_dataset(str(data_dir / "data"), split="test")
    torch.manual_seed(optimization_args.seed)
    initial = CastModel(build_config(model_args))
    trained = CastModel.from_pretrained(output_dir)
    print(
        f"Matching two MoCo views of {len(test_split)} held-out images (chance {1 / len(test_split):.3f}): "
        f"at initialisation {view_retrieval_accuracy(initial, test_split):.3f}, "
        f"after MoCo {view_retrieval_accuracy(trained, test_split):.3f}"
    )


if __name__ == "__main__":
    sys.exit(main())
