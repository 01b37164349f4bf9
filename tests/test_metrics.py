"""Metrics against values computed by hand (the arithmetic is in the comments)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_hierseg.evaluation import metric_path
from hf_hierseg.evaluation.metrics import (
    best_overlap,
    boundary_fscore,
    boundary_map,
    boundary_precision_recall,
    evaluate_hierarchy,
    knn_accuracy,
    majority_label_assignment,
    majority_mean_iou,
    mean_iou,
    segment_matching,
    top_k_accuracy,
)


REPO_ROOT = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------------------------------------------
# mean IoU
# --------------------------------------------------------------------------------------------------------------

# Valid pixels (reference != 255): prediction 0 0 1 1 2 vs reference 0 1 1 1 2.
# class 0: intersect 1, pred 2, ref 1 -> union 2 -> IoU 1/2, accuracy 1/1
# class 1: intersect 2, pred 2, ref 3 -> union 3 -> IoU 2/3, accuracy 2/3
# class 2: intersect 1, pred 1, ref 1 -> union 1 -> IoU 1,   accuracy 1
PREDICTION = np.array([[0, 0, 1], [1, 2, 2]])
REFERENCE = np.array([[0, 1, 1], [1, 2, 255]])


def test_mean_iou_hand_computed():
    result = mean_iou([PREDICTION], [REFERENCE], num_labels=3, ignore_index=255)
    np.testing.assert_allclose(result["per_category_iou"], [1 / 2, 2 / 3, 1])
    np.testing.assert_allclose(result["per_category_accuracy"], [1, 2 / 3, 1])
    assert result["mean_iou"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert result["mean_accuracy"] == pytest.approx((1 + 2 / 3 + 1) / 3)
    assert result["overall_accuracy"] == pytest.approx(4 / 5)


def test_mean_iou_without_ignore_index_counts_255_as_wrong_pixel():
    # The 255 reference pixel is now evaluated: it belongs to no class, but the predicted 2 there adds to class 2's
    # union (pred 2, ref 1, intersect 1 -> IoU 1/2) and the pixel counts as wrong in no class's accuracy.
    result = mean_iou(PREDICTION, REFERENCE, num_labels=3)
    np.testing.assert_allclose(result["per_category_iou"], [1 / 2, 2 / 3, 1 / 2])
    assert result["overall_accuracy"] == pytest.approx(4 / 5)


def test_mean_iou_absent_class_is_nan_and_left_out_of_the_mean():
    result = mean_iou(PREDICTION[None], REFERENCE[None], num_labels=4, ignore_index=255)
    assert np.isnan(result["per_category_iou"][3])
    assert result["mean_iou"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    filled = mean_iou(PREDICTION[None], REFERENCE[None], num_labels=4, ignore_index=255, nan_to_num=-1)
    assert filled["per_category_iou"][3] == -1
    assert filled["mean_iou"] == pytest.approx(result["mean_iou"])


def test_mean_iou_sums_pixels_over_images_before_dividing():
    # Image A: pred [0 1], ref [0 0]; image B: pred [1], ref [1].
    # class 0: intersect 1, pred 1, ref 2 -> 1/2; class 1: intersect 1, pred 2, ref 1 -> 1/2 (per-image mean would
    # give class 1 IoU (0 + 1) / 2 over images that contain it, i.e. a different pooling).
    result = mean_iou([np.array([[0, 1]]), np.array([[1]])], [np.array([[0, 0]]), np.array([[1]])], num_labels=2)
    np.testing.assert_allclose(result["per_category_iou"], [1 / 2, 1 / 2])
    assert result["overall_accuracy"] == pytest.approx(2 / 3)


def test_mean_iou_reduce_labels_and_label_map():
    # reduce_labels: reference [0 1 2 255] -> [255 0 1 255]; valid pixels pred [0 1] vs ref [0 1]: perfect.
    reduced = mean_iou(
        [np.array([[1, 0, 1, 1]])], [np.array([[0, 1, 2, 255]])], num_labels=2, ignore_index=255, reduce_labels=True
    )
    assert reduced["mean_iou"] == pytest.approx(1.0)
    # label_map swaps 1 and 2 at once: reference [1 2] -> [2 1] == prediction.
    swapped = mean_iou([np.array([[2, 1]])], [np.array([[1, 2]])], num_labels=3, label_map={1: 2, 2: 1})
    assert swapped["mean_iou"] == pytest.approx(1.0)


def test_mean_iou_accepts_torch_batches_and_rejects_bad_input():
    result = mean_iou(torch.tensor(PREDICTION)[None], torch.tensor(REFERENCE)[None], num_labels=3, ignore_index=255)
    assert result["mean_iou"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    with pytest.raises(ValueError, match="shape"):
        mean_iou([PREDICTION], [REFERENCE[:, :2]], num_labels=3)
    with pytest.raises(ValueError, match="num_labels"):
        mean_iou([PREDICTION], [REFERENCE], num_labels=0)
    with pytest.raises(ValueError, match="2 predictions but 1"):
        mean_iou([PREDICTION, PREDICTION], [REFERENCE], num_labels=3)
    with pytest.raises(TypeError, match="integer"):
        mean_iou([PREDICTION + 0.5], [REFERENCE], num_labels=3)


# --------------------------------------------------------------------------------------------------------------
# Boundary F-score
# --------------------------------------------------------------------------------------------------------------


def test_boundary_map_marks_both_sides_of_every_edge():
    label_map = np.zeros((3, 3), dtype=int)
    label_map[1, 1] = 1
    # The centre differs from its 4 neighbours: centre + 4 neighbours are boundary, corners are not.
    expected = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=bool)
    np.testing.assert_array_equal(boundary_map(label_map), expected)


def test_boundary_fscore_tolerance_along_a_row():
    # reference [0 0 1 1 1 1]: edge between columns 1|2 -> boundary {1, 2}
    # prediction [0 0 0 0 1 1]: edge between columns 3|4 -> boundary {3, 4}
    reference = np.array([[0, 0, 1, 1, 1, 1]])
    prediction = np.array([[0, 0, 0, 0, 1, 1]])
    # tolerance 0: nothing coincides.
    assert boundary_precision_recall(prediction, reference, tolerance=0) == (0.0, 0.0)
    # tolerance 1: predicted 3 is 1 from 2 (yes), 4 is 2 away (no) -> P 1/2; reference 2 is 1 from 3 (yes),
    # 1 is 2 away (no) -> R 1/2; F 1/2.
    assert boundary_fscore([prediction], [reference], tolerance=1)["boundary_fscore"] == pytest.approx(0.5)
    # tolerance 2: everything within 2 -> F 1.
    assert boundary_fscore([prediction], [reference], tolerance=2)["boundary_fscore"] == pytest.approx(1.0)


def test_boundary_fscore_tolerance_is_euclidean():
    # reference: 1 at (0, 0) -> boundary {(0,0), (0,1), (1,0)}; prediction: 1 at (2, 2) -> {(2,2), (1,2), (2,1)}.
    # (1,2)-(0,1) and (2,1)-(1,0) are diagonal neighbours (distance sqrt 2); every other pair is >= sqrt 5 apart.
    reference = np.zeros((3, 3), dtype=int)
    reference[0, 0] = 1
    prediction = np.zeros((3, 3), dtype=int)
    prediction[2, 2] = 1
    assert boundary_precision_recall(prediction, reference, tolerance=1) == (0.0, 0.0)
    precision, recall = boundary_precision_recall(prediction, reference, tolerance=1.5)
    assert (precision, recall) == (pytest.approx(2 / 3), pytest.approx(2 / 3))


def test_boundary_fscore_ignore_index_and_empty_boundaries():
    # reference [0 0 255 1 1] has boundary {1, 2, 3}; without the ignored pixel 2: {1, 3}.
    # prediction [0 0 0 1 1] has boundary {2, 3}; without pixel 2: {3}. tolerance 0: P = 1/1, R = 1/2, F = 2/3.
    reference = np.array([[0, 0, 255, 1, 1]])
    prediction = np.array([[0, 0, 0, 1, 1]])
    result = boundary_fscore([prediction], [reference], tolerance=0, ignore_index=255)
    assert result["boundary_precision"] == pytest.approx(1.0)
    assert result["boundary_recall"] == pytest.approx(0.5)
    assert result["boundary_fscore"] == pytest.approx(2 / 3)
    # No boundary anywhere: perfect. No predicted boundary but a reference one: F 0.
    flat = np.zeros((4, 4), dtype=int)
    assert boundary_fscore([flat], [flat])["boundary_fscore"] == 1.0
    assert boundary_fscore([flat], [np.eye(4, dtype=int)])["boundary_fscore"] == 0.0
    with pytest.raises(ValueError, match="tolerance"):
        boundary_fscore([flat], [flat], tolerance=-1)


# --------------------------------------------------------------------------------------------------------------
# Top-k accuracy
# --------------------------------------------------------------------------------------------------------------


def test_top_k_accuracy_hand_computed():
    logits = np.array([[0.1, 0.5, 0.4], [0.9, 0.0, 0.1], [0.2, 0.3, 0.5]])
    labels = np.array([2, 0, 0])
    # ranks of the true class: sample 0 -> 1 (0.5 is higher), sample 1 -> 0, sample 2 -> 2.
    result = top_k_accuracy(logits, labels, top_k=(1, 2, 3, 5))
    assert result == {
        "top1_accuracy": pytest.approx(1 / 3),
        "top2_accuracy": pytest.approx(2 / 3),
        "top3_accuracy": 1.0,
        "top5_accuracy": 1.0,  # k above the number of classes: always right
    }
    from_torch = top_k_accuracy(torch.tensor(logits), torch.tensor(labels), top_k=1)
    assert from_torch == {"top1_accuracy": pytest.approx(1 / 3)}
    # A tie goes to the lower class index: label 1 tied with class 0 is ranked second.
    tied = top_k_accuracy(np.array([[1.0, 1.0]]), np.array([1]), top_k=(1, 2))
    assert tied == {"top1_accuracy": 0.0, "top2_accuracy": 1.0}
    with pytest.raises(ValueError, match="labels"):
        top_k_accuracy(logits, labels[:2])
    with pytest.raises(TypeError, match="integers"):
        top_k_accuracy(logits, labels.astype(float))


def test_knn_accuracy_hand_computed():
    # Train a = (1, 0) label 0, b = (0.8, 0.6) label 1, c = (0.6, 0.8) label 1; test (1, 0) with true label 0.
    # Cosine similarities 1, 0.8, 0.6. k = 1: a wins -> correct. k = 3, temperature 100 (near-equal weights):
    # label 1 has two votes -> wrong. k = 3, temperature 0.07: exp(1/0.07) = 1.6e6 > exp(0.8/0.07) + exp(0.6/0.07)
    # = 9.7e4 -> correct. Feature lengths do not matter (cosine).
    train = np.array([[2.0, 0.0], [0.8, 0.6], [0.6, 0.8]])
    labels = np.array([0, 1, 1])
    test, test_labels = np.array([[3.0, 0.0]]), np.array([0])
    assert knn_accuracy(train, labels, test, test_labels, k=1) == {"knn_accuracy": 1.0}
    assert knn_accuracy(train, labels, test, test_labels, k=3, temperature=100) == {"knn_accuracy": 0.0}
    assert knn_accuracy(train, labels, test, test_labels, k=3, temperature=0.07) == {"knn_accuracy": 1.0}
    with pytest.raises(ValueError, match="same D"):
        knn_accuracy(train, labels, np.ones((1, 3)), test_labels)


# --------------------------------------------------------------------------------------------------------------
# Unsupervised matching
# --------------------------------------------------------------------------------------------------------------

# reference          prediction
#  0 0 0 1            5 5 7 7
#  0 0 1 1            5 5 7 7
# reference 0 has 5 pixels, reference 1 has 3. Region 5 = 4 pixels of ref 0; region 7 = 1 pixel of ref 0 + 3 of ref 1.
# IoU(ref 0, 5) = 4 / (4 + 5 - 4) = 4/5;  IoU(ref 0, 7) = 1 / (4 + 5 - 1) = 1/8  -> best 4/5
# IoU(ref 1, 7) = 3 / (4 + 3 - 3) = 3/4                                           -> best 3/4
MATCH_REFERENCE = np.array([[0, 0, 0, 1], [0, 0, 1, 1]])
MATCH_PREDICTION = np.array([[5, 5, 7, 7], [5, 5, 7, 7]])


def test_best_overlap_hand_computed():
    reference_ids, best, sizes = best_overlap(MATCH_PREDICTION, MATCH_REFERENCE)
    np.testing.assert_array_equal(reference_ids, [0, 1])
    np.testing.assert_allclose(best, [4 / 5, 3 / 4])
    np.testing.assert_array_equal(sizes, [5, 3])


def test_segment_matching_over_images():
    # A second image, reference [[2]] predicted as one region [[9]]: best IoU 1.
    # mean over the 3 regions: (4/5 + 3/4 + 1) / 3; covering: image A (5 * 4/5 + 3 * 3/4) / 8 = 0.78125, image B 1.
    result = segment_matching([MATCH_PREDICTION, np.array([[9]])], [MATCH_REFERENCE, np.array([[2]])])
    assert result["mean_best_overlap"] == pytest.approx((4 / 5 + 3 / 4 + 1) / 3)
    assert result["covering"] == pytest.approx((0.78125 + 1) / 2)
    assert result["num_regions"] == 3
    # Not scoring reference 0 (background) leaves only reference 1 (3/4) in image A.
    only_objects = segment_matching([MATCH_PREDICTION], [MATCH_REFERENCE], exclude_labels=(0,))
    assert only_objects["mean_best_overlap"] == pytest.approx(3 / 4)


def test_majority_label_assignment_hand_computed():
    # Region 5 is all reference 0 -> 0; region 7 has 3 pixels of 1 and 1 of 0 -> 1.
    relabelled = majority_label_assignment(MATCH_PREDICTION, MATCH_REFERENCE)
    np.testing.assert_array_equal(relabelled, [[0, 0, 1, 1], [0, 0, 1, 1]])
    # class 0: intersect 4, pred 4, ref 5 -> 4/5; class 1: intersect 3, pred 4, ref 3 -> 3/4; pixel accuracy 7/8.
    result = majority_mean_iou([MATCH_PREDICTION], [MATCH_REFERENCE], num_labels=2)
    np.testing.assert_allclose(result["per_category_iou"], [4 / 5, 3 / 4])
    assert result["overall_accuracy"] == pytest.approx(7 / 8)


def test_majority_label_assignment_ties_and_ignored_regions():
    # Region 3 covers one pixel of label 1 and one of label 0: the tie goes to 0. Region 4 covers only ignored
    # pixels: it gets the ignore index.
    prediction = np.array([[3, 3, 4, 4]])
    reference = np.array([[1, 0, 255, 255]])
    relabelled = majority_label_assignment(prediction, reference, ignore_index=255)
    np.testing.assert_array_equal(relabelled, [[0, 0, 255, 255]])


def test_evaluate_hierarchy_levels():
    # Level 0 is the prediction above. Level 1 merges everything into one region, labelled 0 by majority (5 vs 3):
    # class 0: intersect 5, pred 8, ref 5 -> 5/8; class 1: 0 -> mIoU 5/16; no predicted boundary -> F 0.
    # Level 0 boundary, tolerance 0: reference boundary {(0,2), (0,3), (1,1), (1,2)}, predicted {(0,1), (0,2), (1,1),
    # (1,2)}; 3 in common -> P = R = F = 3/4.
    levels = [MATCH_PREDICTION[None], np.zeros((1, 2, 4), dtype=int)]
    results = evaluate_hierarchy(levels, MATCH_REFERENCE[None], num_labels=2, tolerance=0)
    assert [r["num_segments"] for r in results] == [2, 1]
    assert results[0]["majority_mean_iou"] == pytest.approx((4 / 5 + 3 / 4) / 2)
    assert results[0]["mean_best_overlap"] == pytest.approx((4 / 5 + 3 / 4) / 2)
    assert results[0]["boundary_fscore"] == pytest.approx(3 / 4)
    assert results[1]["majority_mean_iou"] == pytest.approx(5 / 16)
    assert results[1]["majority_pixel_accuracy"] == pytest.approx(5 / 8)
    assert results[1]["boundary_fscore"] == 0.0
    # IoU(ref 0, whole) = 5/8, IoU(ref 1, whole) = 3/8.
    assert results[1]["mean_best_overlap"] == pytest.approx((5 / 8 + 3 / 8) / 2)


# --------------------------------------------------------------------------------------------------------------
# evaluate modules, offline
# --------------------------------------------------------------------------------------------------------------


def test_metric_path_rejects_unknown_names():
    with pytest.raises(ValueError, match="mean_iou"):
        metric_path("no_such_metric")
    assert Path(metric_path("mean_iou")).is_file()


_EVALUATE_SCRIPT = """
import json, numpy as np, evaluate
from hf_hierseg.evaluation import metric_path
prediction = [[0, 0, 1], [1, 2, 2]]
reference = [[0, 1, 1], [1, 2, 255]]
out = {}
iou = evaluate.load(metric_path("mean_iou"))
iou.add_batch(predictions=[prediction], references=[reference])
out["mean_iou"] = iou.compute(num_labels=3, ignore_index=255)["mean_iou"]
boundary = evaluate.load(metric_path("boundary_fscore"))
out["boundary"] = boundary.compute(
    predictions=[[[0, 0, 0, 0, 1, 1]]], references=[[[0, 0, 1, 1, 1, 1]]], tolerance=1
)["boundary_fscore"]
topk = evaluate.load(metric_path("top_k_accuracy"))
out["topk"] = topk.compute(
    predictions=[[0.1, 0.5, 0.4], [0.9, 0.0, 0.1], [0.2, 0.3, 0.5]], references=[2, 0, 0], top_k=[1, 2]
)
matching = evaluate.load(metric_path("segment_matching"))
result = matching.compute(
    predictions=[[[5, 5, 7, 7], [5, 5, 7, 7]]], references=[[[0, 0, 0, 1], [0, 0, 1, 1]]], num_labels=2
)
out["best"] = result["mean_best_overlap"]
out["majority"] = result["majority_mean_iou"]
print(json.dumps(out))
"""


@pytest.mark.slow
def test_evaluate_load_local_modules_offline(tmp_path):
    # A fresh interpreter, offline, with the Hub endpoint pointing at a closed port: nothing may be fetched.
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_ENDPOINT="http://127.0.0.1:9",
        HF_MODULES_CACHE=str(tmp_path / "modules"),
        HF_HOME=str(tmp_path / "hf_home"),
        PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
    )
    completed = subprocess.run(
        [sys.executable, "-c", _EVALUATE_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    out = json.loads(completed.stdout.strip().splitlines()[-1])
    assert out["mean_iou"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert out["boundary"] == pytest.approx(0.5)
    assert out["topk"] == {"top1_accuracy": pytest.approx(1 / 3), "top2_accuracy": pytest.approx(2 / 3)}
    assert out["best"] == pytest.approx((4 / 5 + 3 / 4) / 2)
    assert out["majority"] == pytest.approx((4 / 5 + 3 / 4) / 2)
