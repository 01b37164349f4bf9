"""Pictures of segmentations: boundaries, mean colours, label colours and the hierarchy grid."""

import numpy as np
import PIL.Image
import pytest
import torch

from hf_hierseg.visualization import (
    BOUNDARY_COLOR,
    colorize_labels,
    draw_hierarchy,
    label_boundaries,
    label_palette,
    level_titles,
    overlay_boundaries,
    overlay_labels,
    region_mean_colors,
)


def two_regions():
    """A 4x6 image: left 4 columns red-ish (two shades), right 2 columns blue; labels 7 (left) and 3 (right)."""
    image = np.zeros((4, 6, 3), dtype=np.uint8)
    image[:, :4] = [200, 0, 0]
    image[:2, :4] = [100, 0, 0]
    image[:, 4:] = [0, 0, 90]
    labels = np.full((4, 6), 7)
    labels[:, 4:] = 3
    return image, labels


def test_boundaries_mark_the_pixels_before_a_label_change():
    _, labels = two_regions()
    boundaries = label_boundaries(labels)
    expected = np.zeros((4, 6), dtype=bool)
    expected[:, 3] = True
    np.testing.assert_array_equal(boundaries, expected)
    assert not label_boundaries(np.zeros((5, 5), dtype=np.int64)).any()


def test_region_mean_colors():
    image, labels = two_regions()
    means = region_mean_colors(image, labels)
    np.testing.assert_array_equal(means[:, :4], np.broadcast_to([150, 0, 0], (4, 4, 3)))
    np.testing.assert_array_equal(means[:, 4:], image[:, 4:])


def test_label_colours_are_distinct_and_stable():
    palette = label_palette(256)
    assert len({tuple(color) for color in palette}) == 256
    _, labels = two_regions()
    colors = colorize_labels(torch.from_numpy(labels))
    np.testing.assert_array_equal(colors[0, 0], palette[7])
    np.testing.assert_array_equal(colors[0, 5], palette[3])


def test_overlays():
    image, labels = two_regions()
    with_boundaries = overlay_boundaries(image, labels)
    np.testing.assert_array_equal(with_boundaries[:, 3], np.broadcast_to(BOUNDARY_COLOR, (4, 3)))
    np.testing.assert_array_equal(with_boundaries[:, :3], image[:, :3])
    np.testing.assert_array_equal(overlay_labels(image, labels, alpha=0.0, draw_boundaries=False), image)
    blended = overlay_labels(PIL.Image.fromarray(image), labels, alpha=1.0, draw_boundaries=False)
    np.testing.assert_array_equal(blended, colorize_labels(labels))
    # Label maps of another size are resized (nearest) onto the image.
    upsampled = np.kron(labels, np.ones((2, 2), dtype=int))
    np.testing.assert_array_equal(overlay_boundaries(image, upsampled), with_boundaries)


def test_draw_hierarchy_grid():
    image, labels = two_regions()
    coarse = np.zeros_like(labels)
    grid = draw_hierarchy(image, [labels, coarse], cell_size=40, margin=2)
    assert isinstance(grid, PIL.Image.Image) and grid.mode == "RGB"
    cell_width = 60  # 6 / 4 * 40
    title_height = 14
    assert grid.size == (2 * (cell_width + 2) + 2, 2 * (40 + 2) + title_height + 2)
    pixels = np.asarray(grid)
    top_left = pixels[title_height + 2 : title_height + 42, 2 : 2 + cell_width]  # level 0, boundaries row
    assert (top_left == BOUNDARY_COLOR).all(axis=-1).any()
    bottom_right = pixels[title_height + 44 : title_height + 84, 4 + cell_width : 4 + 2 * cell_width]  # mean colours
    expected = np.rint(image.reshape(-1, 3).mean(axis=0)).astype(np.uint8)
    np.testing.assert_array_equal(np.unique(bottom_right.reshape(-1, 3), axis=0), expected[None])
    assert level_titles([labels, coarse]) == ["superpixels: 2", "level 1: 1 regions"]


def test_draw_hierarchy_bad_input():
    image, labels = two_regions()
    with pytest.raises(ValueError, match="empty"):
        draw_hierarchy(image, [])
    with pytest.raises(ValueError, match="titles"):
        draw_hierarchy(image, [labels], titles=["a", "b"])
    with pytest.raises(ValueError, match="8-bit RGB"):
        draw_hierarchy(image.astype(np.float32), [labels])
    with pytest.raises(ValueError, match="integer label map"):
        draw_hierarchy(image, [labels.astype(np.float32)])


def test_segment_image_example_draws_the_hierarchy_of_a_tiny_model(tmp_path):
    import importlib.util
    from pathlib import Path

    from hf_hierseg import modeling_cast as modeling
    from hf_hierseg.configuration_cast import CastConfig
    from hf_hierseg.image_processing_cast import CastImageProcessor

    torch.manual_seed(0)
    config = CastConfig(hidden_size=24, num_attention_heads=4, depths=(1, 1, 1, 1), num_clusters=(16, 8, 4, 2),
                        image_size=64)  # fmt: skip
    modeling.CastModel(config).save_pretrained(tmp_path / "model")
    CastImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}, num_superpixels=49,
                       superpixel_reference_size=64).save_pretrained(tmp_path / "model")  # fmt: skip
    rng = np.random.default_rng(0)
    photo = np.kron(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), np.ones((12, 12, 1), dtype=np.uint8))
    PIL.Image.fromarray(photo).save(tmp_path / "photo.png")

    path = Path(__file__).resolve().parents[1] / "examples" / "segment_image.py"
    spec = importlib.util.spec_from_file_location("segment_image", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.main([str(tmp_path / "photo.png"), "--model", str(tmp_path / "model"), "--out", str(tmp_path / "out.png"),
                  "--cell_size", "64"])  # fmt: skip
    grid = PIL.Image.open(tmp_path / "out.png")
    assert grid.size == (5 * (64 + 4) + 4, 2 * (64 + 4) + 14 + 4)  # superpixels + 4 levels, two rows
