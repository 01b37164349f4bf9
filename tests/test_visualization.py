"""Pictures of segmentations: boundaries, mean colours, label colours and the hierarchy grid."""

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
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


def test_segment_image_example_draws_the_hierarchy_of_a_tiny_model(tmp_path, cast_tester):
    import importlib.util
    from pathlib import Path

    processor = cast_tester.get_image_processor(size={"shortest_edge": 64}, num_superpixels=49,
                                                superpixel_reference_size=64)  # fmt: skip
    cast_tester.save_model_folder(tmp_path / "model", processor=processor)
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


# -- the same pictures as the straightforward implementations, on real photos --------------------------------------


def previous_overlay_labels(image, labels, alpha=0.5):
    """`overlay_labels` before the lookup table: the blend in float64, rounded, boundaries drawn."""
    image = np.asarray(image)
    blended = (1.0 - alpha) * image.astype(np.float64) + alpha * label_palette(int(labels.max()) + 1)[labels]
    return overlay_boundaries(np.rint(blended).astype(np.uint8), labels)


def previous_region_mean_colors(image, labels):
    """`region_mean_colors` by `np.unique`."""
    image = np.asarray(image)
    _, inverse = np.unique(labels, return_inverse=True)
    inverse = inverse.reshape(-1)
    counts = np.bincount(inverse)
    pixels = image.reshape(-1, 3).astype(np.float64)
    sums = np.stack([np.bincount(inverse, weights=pixels[:, c], minlength=len(counts)) for c in range(3)], axis=1)
    return np.rint(sums / counts[:, None]).astype(np.uint8)[inverse].reshape(image.shape)


def previous_draw_hierarchy(image, level_maps, titles, cell_size=224, margin=4):
    """`draw_hierarchy` before drawing at the cell size: full-size pictures, then PIL's nearest resize."""
    image = np.asarray(image)
    cell_height, cell_width = cell_size, max(1, round(image.shape[1] * cell_size / image.shape[0]))
    font = PIL.ImageFont.load_default(size=max(10, cell_height // 14))
    title_height = max(14, cell_height // 10)
    grid = PIL.Image.new(
        "RGB",
        (len(level_maps) * (cell_width + margin) + margin, 2 * (cell_height + margin) + title_height + margin),
        (255, 255, 255),
    )
    draw = PIL.ImageDraw.Draw(grid)
    for column, (labels, title) in enumerate(zip(level_maps, titles)):
        left = margin + column * (cell_width + margin)
        draw.text((left, margin // 2), title, fill=(0, 0, 0), font=font)
        pictures = (overlay_boundaries(image, labels), previous_region_mean_colors(image, labels))
        for row, picture in enumerate(pictures):
            cell = PIL.Image.fromarray(picture).resize((cell_width, cell_height), PIL.Image.NEAREST)
            grid.paste(cell, (left, title_height + margin + row * (cell_height + margin)))
    return grid


def test_pictures_equal_the_straightforward_implementations_on_real_photos():
    from hf_hierseg.evaluation import real_photos

    try:
        photos = [real_photos.load_voc_photo()["image"]] + [p["image"] for p in real_photos.load_imagenet_photos()[:2]]
    except real_photos.RealPhotosUnavailableError as error:
        pytest.skip(f"real photos unavailable: {error}")
    rng = np.random.default_rng(0)
    for photo in photos:
        width, height = photo.size
        level_maps = []
        for count, grid in ((60, 23), (20, 11), (6, 5)):  # blocky maps of many sizes, as resized hierarchies are
            coarse = rng.integers(0, count, (grid, grid + 3)).astype(np.int32)
            level_maps.append(np.asarray(PIL.Image.fromarray(coarse).resize((width, height), PIL.Image.NEAREST)))
        level_maps[0] = level_maps[0].astype(np.int64) * 10**6 + 7  # sparse, large ids
        for alpha in (0.5, 0.3):
            np.testing.assert_array_equal(overlay_labels(photo, level_maps[1], alpha),
                                          previous_overlay_labels(photo, level_maps[1], alpha))  # fmt: skip
        for labels in level_maps:
            np.testing.assert_array_equal(
                region_mean_colors(photo, labels), previous_region_mean_colors(photo, labels)
            )
        titles = ["a", "b", "c"]
        for cell_size in (224, 97):
            np.testing.assert_array_equal(
                np.asarray(draw_hierarchy(photo, level_maps, titles, cell_size=cell_size)),
                np.asarray(previous_draw_hierarchy(photo, level_maps, titles, cell_size=cell_size)),
            )
