"""The authors' VOC protocol (hf_hierseg.evaluation.segment_retrieval): memory of labelled training segments,
nearest-neighbour labels, mIoU; hand-made data with known answers, and tiny CAST / ViT segmenters."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import ViTModel

from hf_hierseg import CastForImageClassification, CastForSemanticSegmentation, CastModel
from hf_hierseg.errors import InvalidInputError
from hf_hierseg.evaluation import make_vit_like, write_synthetic_dataset
from hf_hierseg.evaluation.metrics import majority_mean_iou
from hf_hierseg.evaluation.segment_retrieval import (
    CastRetrievalSegments,
    ImageSegments,
    SegmentMemory,
    VitRetrievalSegments,
    evaluate_segment_retrieval,
    grid_partition,
    grid_shape,
    majority_class_floor,
    majority_segment_labels,
    retrieval_scores,
    retrieve_labels,
    superpixel_grid_partition,
    unit_prototypes,
    view_batches,
    view_size,
)
from hf_hierseg.evaluation.synthetic import generate_example
from hf_hierseg.evaluation.views import evaluation_processor

from cast_testing import CONFIG_DEFAULT, CastModelTester


REPO_ROOT = Path(__file__).resolve().parents[1]
TESTER = CastModelTester(graph_pooling_num_heads=4)
HIDDEN_SIZE = TESTER.config_kwargs["hidden_size"]
NO_RESIZE = {"do_resize": False, "do_center_crop": False}


# --------------------------------------------------------------------------------------------------------------
# The steps, on hand-made data
# --------------------------------------------------------------------------------------------------------------


def test_majority_labels_count_the_ignore_label_as_a_label():
    segments = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3]])
    labels = np.array([[5, 5, 255, 255], [5, 1, 255, 2], [1, 2, 0, 0]])
    # segment 0: 5,5,5,1 -> 5; segment 1: 255 x3, 2 -> ignored (dropped from a memory); segment 2: 1 vs 2 tie -> 1.
    assert majority_segment_labels(segments, labels, 6, ignore_index=255).tolist() == [5, 255, 1, 0]
    assert majority_segment_labels(segments[:2, :2], labels[:2, :2], 6).tolist() == [5]
    with pytest.raises(InvalidInputError, match="0..5"):
        majority_segment_labels(segments, labels, 6)  # 255 is not a label without an ignore index

    memory = SegmentMemory(num_labels=6)
    memory.add(torch.eye(4), majority_segment_labels(segments, labels, 6, ignore_index=255))
    assert len(memory) == 3 and memory.labels.tolist() == [5, 1, 0]
    torch.testing.assert_close(memory.prototypes, torch.eye(4)[[0, 2, 3]])


def test_prototypes_are_the_normalised_area_weighted_sum_of_normalised_embeddings():
    embeddings = torch.tensor([[3.0, 0.0], [0.0, 0.5], [0.0, 2.0], [1.0, 1.0]])
    weights = torch.tensor([1.0, 3.0, 1.0, 2.0])
    prototypes = unit_prototypes(embeddings, weights, torch.tensor([0, 0, 1, 1]), 2)
    # segment 0: 1 * (1, 0) + 3 * (0, 1) = (1, 3); segment 1: (0, 1) + 2 * (0.707, 0.707).
    expected = F.normalize(torch.tensor([[1.0, 3.0], [2**0.5, 1 + 2**0.5]]), dim=-1)
    torch.testing.assert_close(prototypes, expected)


def test_the_nearest_segments_vote_unweighted_and_ties_go_to_the_smaller_label():
    angles = torch.tensor([0.0, 0.1, 0.2, 1.5, 1.6, 3.0])
    memory = torch.stack([angles.cos(), angles.sin()], dim=1)
    labels = torch.tensor([2, 2, 1, 1, 1, 0])
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    # k=3: query 0's neighbours 2, 2, 1 -> 2; query 1's 1, 1, 1 -> 1; query 2's 0 (3.0), 1 (1.6), 1 (1.5) -> 1.
    assert retrieve_labels(queries, memory, labels, 3, top_k=3).tolist() == [2, 1, 1]
    # k=1: the single nearest; k=4 for query 0: 2, 2, 1, 1 -> tie -> 1.
    assert retrieve_labels(queries, memory, labels, 3, top_k=1).tolist() == [2, 1, 0]
    assert retrieve_labels(queries[:1], memory, labels, 3, top_k=4).tolist() == [1]
    assert retrieve_labels(queries, memory, labels, 3, top_k=100).tolist() == [1, 1, 1]  # all 6: 1 wins
    with pytest.raises(InvalidInputError, match="no labelled segment"):
        retrieve_labels(queries, memory[:0], labels[:0], 3)


def test_scores_give_both_means_over_the_dataset():
    predictions = [np.array([[0, 0], [1, 1]]), np.array([[0, 1], [1, 1]])]
    masks = [np.array([[0, 0], [1, 255]]), np.array([[0, 0], [1, 1]])]
    scores = retrieval_scores(predictions, masks, num_labels=3, ignore_index=255)
    # Summed over both images (the 255 pixel left out): class 0: TP 3, FP 0, FN 1 -> 0.75; class 1: TP 3, FP 1,
    # FN 0 -> 0.75; class 2 absent from both: left out of `mean_iou`, 0 in the authors' sum / 3.
    assert scores["mean_iou"] == pytest.approx(0.75)
    assert scores["mean_iou_all_classes"] == pytest.approx(0.5)
    assert scores["pixel_accuracy"] == pytest.approx(6 / 7)


class ColourSegments:
    """A stand-in segmenter with known segments and embeddings: each of the first `levels` is the image's colour
    regions (exact RGB values), embedded by the one-hot of the colour's index in `palette`."""

    name = "colours"

    def __init__(self, palette, levels=(1,)):
        self.palette, self.levels = [tuple(colour) for colour in palette], tuple(levels)

    def __call__(self, images):
        results = []
        for image in images:
            pixels = np.asarray(image)
            colour_index = np.zeros(pixels.shape[:2], dtype=np.int64)
            for index, colour in enumerate(self.palette):
                colour_index[(pixels == colour).all(-1)] = index
            present, segment_map = np.unique(colour_index, return_inverse=True)
            prototypes = F.one_hot(torch.from_numpy(present), len(self.palette)).float()
            segment_map = torch.from_numpy(segment_map.reshape(colour_index.shape))
            results.append(ImageSegments([segment_map] * len(self.levels), [prototypes] * len(self.levels)))
        return results


def colour_image(cells):
    """An 8 x 8 image of 2 x 2 cells of 4 x 4 pixels, one colour each (no resize: the views are 8 x 8)."""
    return Image.fromarray(np.kron(np.array(cells, dtype=np.uint8), np.ones((4, 4, 1), dtype=np.uint8)))


def cell_mask(cells):
    return np.kron(np.array(cells), np.ones((4, 4), dtype=np.int64))


def test_the_protocol_on_colour_segments_gives_the_hand_computed_scores():
    red, green, blue, white = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)
    segmenter = ColourSegments([red, green, blue, white], levels=(1, 2))
    # Memory segments (colour: majority label): red 1, white 0 | green 2, white 0 | green 2, white 0, blue: a tie
    # of 2 and 1 -> 1.
    memory = [
        (colour_image([[red, red], [white, white]]), cell_mask([[1, 1], [0, 0]])),
        (colour_image([[green, green], [white, white]]), cell_mask([[2, 2], [0, 0]])),
        (colour_image([[green, white], [blue, blue]]), cell_mask([[2, 0], [2, 1]])),
    ]
    query = [(colour_image([[red, green], [blue, white]]), cell_mask([[1, 2], [1, 0]]))]
    # k=1: every query segment takes the label of the memory segment of its colour: all pixels right.
    results = evaluate_segment_retrieval(segmenter, memory, query, num_labels=3, image_size=8, top_k=1)
    assert [result["level"] for result in results] == [1, 2]
    for result in results:
        assert result["memory_size"] == 7 and result["num_segments"] == 4
        assert result["mean_iou"] == pytest.approx(1.0) and result["pixel_accuracy"] == pytest.approx(1.0)
    # k=7: the whole memory votes (labels 1, 0, 2, 0, 2, 0, 1): 0 everywhere. IoU: background 16 / 64, 0, 0.
    (result, _) = evaluate_segment_retrieval(segmenter, memory, query, num_labels=3, image_size=8, top_k=7)
    assert result["mean_iou"] == pytest.approx(0.25 / 3) and result["pixel_accuracy"] == pytest.approx(0.25)


def test_views_keep_the_aspect_ratio_and_stride_and_batch_by_size():
    assert view_size(375, 500, 512, "longest_edge") == (384, 512)  # a VOC image
    assert view_size(500, 333, 512, "longest_edge") == (512, 336)  # 340.9 -> 336
    assert view_size(375, 500, 64) == (64, 64)
    with pytest.raises(ValueError, match="geometry"):
        view_size(10, 10, 8, "crop")
    images = [Image.new("RGB", size) for size in ((50, 40), (100, 80), (40, 50), (50, 40))]
    batches = list(view_batches([(image, None) for image in images], 64, "longest_edge", batch_size=2))
    assert [[view.size for view in views] for views, _ in batches] == [[(64, 48), (64, 48)], [(48, 64)], [(64, 48)]]


def test_floors():
    grid = grid_partition(64, 96, 8)
    assert grid.shape == (64, 96) and len(np.unique(grid)) == 8 and grid[0, 0] != grid[-1, -1]
    assert grid_shape(8, 64, 96) == (2, 4) and grid_shape(32, 64, 64) == (4, 8) and grid_shape(5, 64, 64) == (1, 5)
    assert len(np.unique(grid_partition(64, 64, 32))) == 32
    superpixels = np.repeat(np.repeat(np.arange(16).reshape(4, 4), 4, axis=0), 4, axis=1)  # 16 squares of 4 px
    grouped = superpixel_grid_partition(superpixels, 4)
    assert len(np.unique(grouped)) == 4
    for label in range(16):  # each superpixel inside one group
        assert len(np.unique(grouped[superpixels == label])) == 1
    memory = [np.array([[0, 0, 0, 1]]), np.array([[0, 2, 255, 255]])]
    floor = majority_class_floor(memory, [np.array([[0, 1, 0, 2]])], num_labels=3, ignore_index=255)
    assert floor["label"] == 0 and floor["mean_iou"] == pytest.approx(0.5 / 3)  # IoU 0.5 for background, 0, 0


# --------------------------------------------------------------------------------------------------------------
# CAST and ViT segmenters
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def images():
    return [generate_example(index, variant="camouflage")["image"] for index in range(3)]


def test_cast_segments_follow_the_hierarchy_and_prototypes_are_unit(images):
    torch.manual_seed(0)
    model = CastForImageClassification(TESTER.get_config(num_labels=6)).eval()
    processor = evaluation_processor(NO_RESIZE, superpixel_method="seeds", num_superpixels=600)
    segmenter = CastRetrievalSegments(model, processor, levels=(1, 4))
    assert segmenter.embedding == "levels"
    results = segmenter(images)
    inputs = processor(images=images, do_resize=False, do_center_crop=False, return_tensors="pt")
    with torch.no_grad():
        maps = model(**inputs).hierarchy_maps(inputs["superpixels"])
    for index, segments in enumerate(results):
        for level, segment_map, prototypes in zip((1, 4), segments.segment_maps, segments.prototypes):
            # The same partition as the hierarchy's map, numbered 0..S-1.
            reference = maps[level][index].numpy()
            assert segment_map.shape == (64, 64) and set(np.unique(segment_map.numpy())) == set(range(len(prototypes)))
            pairs = np.unique(np.stack([segment_map.numpy().ravel(), reference.ravel()]), axis=1)
            assert len(pairs[0]) == len(np.unique(pairs[0])) == len(np.unique(pairs[1]))
            assert prototypes.shape == (len(np.unique(reference)), 4 * HIDDEN_SIZE)
            torch.testing.assert_close(prototypes.norm(dim=-1), torch.ones(len(prototypes)))
        assert (
            len(segments.prototypes[0]) <= TESTER.config_kwargs["num_clusters"][0] and len(segments.prototypes[1]) <= 2
        )
    last = CastRetrievalSegments(model, processor, levels=(4,), embedding="last")(images[:1])[0]
    assert last.prototypes[0].shape[1] == HIDDEN_SIZE
    with pytest.raises(InvalidInputError, match="CastForSemanticSegmentation"):
        CastRetrievalSegments(model, processor, embedding="fused")(images[:1])
    with pytest.raises(ValueError, match="levels are 1..4"):
        CastRetrievalSegments(model, processor, levels=(0,))


def test_fused_embeddings_of_a_segmentation_model_are_the_authors(images):
    torch.manual_seed(0)
    config = TESTER.get_config(num_labels=32, segmentation_head_type="mlp_projector", projection_hidden_dim=48)
    model = CastForSemanticSegmentation(config).eval()  # a converted MoCo cast_seg: BlockFusion + projector
    processor = evaluation_processor(NO_RESIZE, superpixel_method="seeds", num_superpixels=600)
    segmenter = CastRetrievalSegments(model, processor, levels=(4,))
    assert segmenter.embedding == "fused"
    (segments,) = segmenter(images[:1])
    inputs = processor(images=images[:1], do_resize=False, do_center_crop=False, return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs)
    # The authors: every pixel its superpixel's embedding, L2-normalised; a segment's prototype the normalised sum.
    superpixels = inputs["superpixels"][0]  # pooled at full resolution: the superpixels are the tokens
    pixels = F.normalize(outputs.segment_logits[0], dim=-1)[superpixels.flatten()]  # [H*W, 32]
    level4 = outputs.hierarchy_maps(inputs["superpixels"])[4][0].flatten()
    ids, inverse = torch.unique(level4, return_inverse=True)
    expected = F.normalize(torch.zeros(len(ids), 32).index_add_(0, inverse, pixels), dim=-1)
    torch.testing.assert_close(segments.prototypes[0], expected, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(segments.segment_maps[0].numpy().ravel(), inverse.numpy())


def test_vit_segments_are_its_kmeans_levels(images):
    torch.manual_seed(0)
    vit = ViTModel(
        make_vit_like(TESTER.get_config(num_labels=CONFIG_DEFAULT), patch_size=8), add_pooling_layer=False
    ).eval()
    processor = evaluation_processor(NO_RESIZE, superpixel_method="grid")
    for embedding, width in (("levels", 4 * HIDDEN_SIZE), ("last", HIDDEN_SIZE)):
        segmenter = VitRetrievalSegments(
            vit, processor, (16, 4), levels=(1, 3), embedding=embedding, max_fit_pixels=256, max_prototype_pixels=1024
        )
        for segments in segmenter(images):
            for segment_map, prototypes, clusters in zip(segments.segment_maps, segments.prototypes, (16, 4)):
                assert segment_map.shape == (64, 64) and 1 <= len(prototypes) <= clusters
                assert set(np.unique(segment_map.numpy())) == set(range(len(prototypes)))
                assert prototypes.shape[1] == width
                torch.testing.assert_close(prototypes.norm(dim=-1), torch.ones(len(prototypes)))
    with pytest.raises(ValueError, match="one cluster count per level"):
        VitRetrievalSegments(vit, processor, (16,), levels=(1, 2))


def test_a_shared_embedding_retrieves_its_own_images_perfectly(images):
    # Memory = queries: each query segment's nearest memory segment (k=1) is itself, so its label is its majority
    # label, and the score is the majority-label mIoU of the segments (here computed independently).
    torch.manual_seed(0)
    model = CastModel(TESTER.get_config(num_labels=CONFIG_DEFAULT)).eval()
    processor = evaluation_processor(NO_RESIZE, superpixel_method="seeds", num_superpixels=600)
    segmenter = CastRetrievalSegments(model, processor, levels=(2,))
    pairs = []
    for index in range(3):
        example = generate_example(index, variant="camouflage")
        pairs.append((example["image"], np.asarray(example["object_mask"]).astype(np.int64)))
    (result,) = evaluate_segment_retrieval(segmenter, pairs, pairs, num_labels=7, image_size=64, top_k=1)
    segment_maps = [segments.segment_maps[0] for segments in segmenter([image for image, _ in pairs])]
    expected = majority_mean_iou(segment_maps, [mask for _, mask in pairs], num_labels=7)
    assert result["mean_iou"] == pytest.approx(expected["mean_iou"])


# --------------------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("retrieval")
    torch.manual_seed(0)
    CastForImageClassification(TESTER.get_config(num_labels=6)).save_pretrained(root / "cast")
    data = write_synthetic_dataset(root / "data", num_images=6, num_test_images=3, variant="camouflage")
    return SimpleNamespace(root=root, model_dir=root / "cast", data_dir=data)


def test_evaluate_segment_retrieval_command(tiny_files, capsys):
    from hf_hierseg.cli import main

    output = tiny_files.root / "retrieval.json"
    arguments = ["--model_name_or_path", tiny_files.model_dir, "--dataset_name", tiny_files.data_dir]
    arguments += ["--levels", "1", "4", "--num_superpixels", "600", "--vit_patch_size", "8"]
    arguments += ["--vit_max_fit_pixels", "256", "--output_json", output]
    assert main(["evaluate", "segment-retrieval", *arguments]) == 0
    run = json.loads(output.read_text())
    assert run["num_memory_images"] == 6 and run["num_query_images"] == 3 and run["num_labels"] == 7
    assert run["random_vit_weights"] and list(run["models"]) == ["cast", "vit_kmeans"]
    assert run["settings"]["embedding"] == "levels" and run["settings"]["top_k"] == 20
    for levels in run["models"].values():
        assert [score["level"] for score in levels] == [1, 4]
        for score in levels:
            assert score["memory_size"] > 0 and 0.0 <= score["mean_iou_all_classes"] <= score["mean_iou"] <= 1.0
    report = capsys.readouterr().out
    assert "| CAST (levels) | 4 |" in report and "| ViT/8 + k-means | 1 |" in report and "floor" in report
    assert main(["evaluate", "segment-retrieval", *arguments[:4], "--no_vit", "--query_split", "nope"]) == 1


@pytest.mark.slow
def test_evaluate_segment_retrieval_script(tiny_files):
    output = tiny_files.root / "script.json"
    command = [sys.executable, str(REPO_ROOT / "scripts" / "evaluate_segment_retrieval.py")]
    command += ["--model_name_or_path", str(tiny_files.model_dir), "--dataset_name", str(tiny_files.data_dir)]
    command += ["--no_vit", "--max_query_samples", "2", "--output_json", str(output)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, timeout=600)
    assert result.returncode == 0, result.stderr
    run = json.loads(output.read_text())
    assert run["num_query_images"] == 2 and [score["level"] for score in run["models"]["cast"]] == [4]
