#!/usr/bin/env python
"""Fine-tune CAST for semantic segmentation on image + mask pairs (Accelerate; 1 or N processes).

Example (synthetic data, a few CPU minutes):
    python scripts/make_synthetic_dataset.py --output_dir outputs/synthetic --num_images 600
    python scripts/train_segmentation.py --dataset_name outputs/synthetic --label_column_name object_mask \
        --num_labels 7 --config_name cast-small --config_overrides hidden_size=96 num_attention_heads=4 \
        depths=1,1,1,1 num_clusters=16,8,4,2 image_size=64 graph_pooling_num_heads=4 \
        --num_superpixels 196 --max_train_steps 300 --eval_steps 100 --output_dir outputs/seg
"""

from hf_hierseg.training.segmentation import segmentation_parser, train_segmentation


def main(argv=None):
    args = segmentation_parser().parse_args(argv)
    metrics = train_segmentation(args)
    print({key: value for key, value in metrics.items() if not key.startswith("eval_iou_")})


if __name__ == "__main__":
    main()
