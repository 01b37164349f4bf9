"""SAM's automatic masks without torchvision (`hf_hierseg.evaluation.sam_masks`): the non-maximum suppression
against a plain loop and hand examples, the run-length decoding, and transformers' mask-generation pipeline on a
tiny random SAM saved offline."""

import itertools

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import SamConfig, SamImageProcessorPil, SamModel

from hf_hierseg.evaluation.sam_masks import (
    SamMaskGenerationPipeline,
    box_iou,
    non_maximum_suppression,
    rle_to_mask,
    sam_mask_generator,
)


def save_tiny_sam(folder):
    """A randomly initialised SAM with 128-pixel inputs and its image processor, saved in `folder`."""
    vision = dict(
        hidden_size=32, output_channels=16, num_hidden_layers=2, num_attention_heads=2, image_size=128, patch_size=16,
        mlp_dim=64, global_attn_indexes=[1], window_size=4, num_pos_feats=8,
    )  # fmt: skip
    prompt_encoder = dict(hidden_size=16, image_size=128, patch_size=16, mask_input_channels=4)
    mask_decoder = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, mlp_dim=32, iou_head_hidden_dim=16)
    config = SamConfig(vision_config=vision, prompt_encoder_config=prompt_encoder, mask_decoder_config=mask_decoder)
    torch.manual_seed(0)
    SamModel(config).eval().save_pretrained(folder)
    SamImageProcessorPil(size={"longest_edge": 128}, pad_size={"height": 128, "width": 128}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_sam(tmp_path_factory):
    return save_tiny_sam(tmp_path_factory.mktemp("tiny_sam"))


def loop_nms(boxes, scores, threshold):
    """Greedy suppression, one pair at a time, in plain Python."""

    def iou(a, b):
        width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - width * height
        return width * height / union if union > 0 else 0.0

    order = sorted(range(len(scores)), key=lambda index: -scores[index])  # sorted() is stable: ties keep order
    kept = []
    for index in order:
        if all(iou(boxes[index], boxes[other]) <= threshold for other in kept):
            kept.append(index)
    return kept


def test_suppression_by_hand():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 5], [5, 0, 15, 10]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.95, 0.6])
    # IoU: boxes 0 and 1 81 / 119; 0 and 3 50 / 100; 0 and 4 50 / 150; 2 overlaps nothing.
    assert box_iou(boxes)[0, 1].item() == pytest.approx(81 / 119)
    assert non_maximum_suppression(boxes, scores, 0.5).tolist() == [3, 0, 2, 4]  # 1 goes (0.68 with box 0)
    assert non_maximum_suppression(boxes, scores, 0.3).tolist() == [3, 2, 4]  # 0 and 1 go (0.5, 0.32 with 3)
    assert non_maximum_suppression(boxes, scores, 1.0).tolist() == [3, 0, 1, 2, 4]  # nothing is above 1
    tied = torch.tensor([0.5, 0.5])
    assert non_maximum_suppression(boxes[:2], tied, 0.5).tolist() == [0]  # equal scores: the earlier box first
    empty = non_maximum_suppression(torch.zeros(0, 4), torch.zeros(0), 0.7)
    assert empty.dtype == torch.long and empty.numel() == 0


def test_suppression_equals_a_loop_on_random_boxes():
    generator = torch.Generator().manual_seed(0)
    for count, threshold in itertools.product((1, 7, 40), (0.0, 0.3, 0.7)):
        corners = torch.randint(0, 50, (count, 2, 2), generator=generator).float()
        boxes = torch.cat([corners.min(dim=1).values, corners.max(dim=1).values], dim=1)  # some have no area
        scores = torch.randint(0, 5, (count,), generator=generator).float()  # many ties
        expected = loop_nms(boxes.tolist(), scores.tolist(), threshold)
        assert non_maximum_suppression(boxes, scores, threshold).tolist() == expected, (count, threshold)


def test_suppression_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"boxes \[N, 4\]"):
        non_maximum_suppression(torch.zeros(3, 2), torch.zeros(3), 0.5)
    with pytest.raises(ValueError, match="scores"):
        non_maximum_suppression(torch.zeros(3, 4), torch.zeros(2), 0.5)


def test_run_length_decoding():
    # Column-major runs of [[0, 1, 1], [0, 0, 1]]: 0 0 | 1 | 0 | 1 1.
    mask = rle_to_mask({"size": [2, 3], "counts": [2, 1, 1, 2]})
    np.testing.assert_array_equal(mask, [[False, True, True], [False, False, True]])
    assert rle_to_mask({"size": [2, 2], "counts": [0, 4]}).all()  # starting with a True run: a zero-length False one
    with pytest.raises(ValueError, match="cover 5 pixels, not 2 x 3"):
        rle_to_mask({"size": [2, 3], "counts": [2, 3]})


def noise_image(height, width, seed=0):
    return Image.fromarray((np.random.RandomState(seed).rand(height, width, 3) * 255).astype("uint8"))


def test_mask_generation_without_torchvision(tiny_sam):
    """The whole pipeline runs; what it keeps is greedy suppression of the boxes and scores of every mask the
    point batches found (all of them with the threshold at 1)."""
    generator = sam_mask_generator(str(tiny_sam))
    assert isinstance(generator, SamMaskGenerationPipeline)
    image = noise_image(48, 40)
    everything = dict(points_per_crop=4, points_per_batch=8, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    found = generator(image, crops_nms_thresh=1.0, output_bboxes_mask=True, output_rle_mask=True, **everything)
    kept = generator(image, crops_nms_thresh=0.5, output_bboxes_mask=True, **everything)
    assert len(found["masks"]) >= 2 and all(mask.shape == (48, 40) and mask.dtype == bool for mask in found["masks"])
    assert (found["scores"][:-1] >= found["scores"][1:]).all()  # highest score first
    expected = loop_nms(found["bounding_boxes"].tolist(), found["scores"].tolist(), 0.5)
    assert len(kept["masks"]) == len(expected) < len(found["masks"])
    for mask, index in zip(kept["masks"], expected, strict=True):
        np.testing.assert_array_equal(mask, found["masks"][index])
    for mask, encoding in zip(found["masks"], found["rle_mask"], strict=True):
        np.testing.assert_array_equal(rle_to_mask(encoding), mask)
