"""The shared tester of the test suite: one tiny CAST configuration, its inputs and its checks, in the style of
transformers' `ViTModelTester` / `Dinov2ModelTester`, and the small helpers many test files need (superpixel
grids, smooth photos, the nesting check of a hierarchy, a saved tiny model folder).

A test file takes a `CastModelTester` (the `cast_tester` fixture of conftest.py, or its own instance with other
constructor arguments) and asks it for configs with overrides, `tester.get_config(num_labels=4)`, instead of
spelling out a config of its own.
"""

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hf_hierseg import (
    CastConfig,
    CastForHierarchicalImageClassification,
    CastForImageClassification,
    CastForSemanticSegmentation,
    CastImageProcessor,
    CastModel,
)


# species -> genus -> family: 6 -> 3 -> 2 classes (the default taxonomy of the hierarchical classifier).
TAXONOMY_PARENTS = ((0, 0, 1, 1, 2, 2), (0, 1, 1))
TAXONOMY_NAMES = (
    {i: f"species{i}" for i in range(6)},
    {0: "genus0", 1: "genus1", 2: "genus2"},
    {0: "family0", 1: "family1"},
)
TAXONOMY = dict(
    hierarchy_num_labels=(6, 3, 2),
    hierarchy_parents=TAXONOMY_PARENTS,
    hierarchy_id2label=TAXONOMY_NAMES,
    hierarchy_level_names=("species", "genus", "family"),
)


# An override that leaves a config field to CastConfig's default (`num_labels=CONFIG_DEFAULT`: the taxonomy's).
CONFIG_DEFAULT = object()

# The config fields that fix the tiny architecture (`CastModelTester.config_overrides`).
ARCHITECTURE = ("hidden_size", "num_attention_heads", "depths", "num_clusters", "image_size")


def override_text(value):
    """A config value as `--config_overrides` writes it: tuples comma-separated."""
    return ",".join(str(item) for item in value) if isinstance(value, (tuple, list)) else str(value)


# --- inputs ------------------------------------------------------------------------------------------------------


def grid_superpixels(batch, height, width=None, cell=16, offset=0):
    """Rectangular superpixels of `cell` px, numbered row-major from `offset`, [batch, height, width] int64: a
    deterministic stand-in for SEEDS (ceil(height / cell) x ceil(width / cell) segments)."""
    width = height if width is None else width
    rows = torch.arange(height)[:, None] // cell
    cols = torch.arange(width)[None, :] // cell
    labels = rows * ((width + cell - 1) // cell) + cols + offset
    return labels.expand(batch, height, width).clone()


def random_superpixels(batch, size=64, num_segments=30, cell=4, seed=0, generator=None):
    """Irregular superpixels: a random label in [0, num_segments) per `cell` x `cell` block, relabelled to be
    consecutive per image. Draws from `generator` when given (so a caller can draw pixels after it), else from a
    fresh one seeded with `seed`."""
    generator = torch.Generator().manual_seed(seed) if generator is None else generator
    blocks = torch.randint(0, num_segments, (batch, size // cell, size // cell), generator=generator)
    labels = blocks.repeat_interleave(cell, 1).repeat_interleave(cell, 2)
    return torch.stack([torch.unique(image, return_inverse=True)[1] for image in labels])


def smooth_photo(width, height, seed, cells=(6, 6)):
    """A PIL photo of smooth random colours: a `cells` (rows, columns) grid of random colours resized bicubically,
    so SEEDS has edges to follow."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (*cells, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((width, height), Image.BICUBIC)


def assert_hierarchy_nests(label_maps):
    """Every region of a level lies inside exactly one region of the next level, in every image of the batch.
    `label_maps`: the levels' [B, H, W] (or [H, W]) label maps, finest first."""
    for level, (fine, coarse) in enumerate(zip(label_maps[:-1], label_maps[1:])):
        fine, coarse = torch.as_tensor(fine), torch.as_tensor(coarse)
        assert fine.shape == coarse.shape, (level, fine.shape, coarse.shape)
        if fine.dim() == 2:
            fine, coarse = fine[None], coarse[None]
        for image, (fine_map, coarse_map) in enumerate(zip(fine, coarse)):
            pairs = torch.stack([fine_map.flatten(), coarse_map.flatten()], 1).unique(dim=0)
            assert len(pairs) == len(fine_map.unique()), f"a region of level {level} (image {image}) is split"


# --- the tester --------------------------------------------------------------------------------------------------


class CastModelTester:
    """A tiny CAST: its config (with overrides), inputs and the checks of every model class's outputs.

    The defaults build in a few milliseconds: width 24, 4 heads, one block per level, 16 -> 8 -> 4 -> 2 clusters,
    64 px images cut into a grid of 16 px superpixels (16 segments). Constructor keywords not named below are
    config fields given to every config (`mask_padding_tokens=True`, `graph_pooling_num_heads=4`, ...).
    """

    def __init__(
        self,
        batch_size=2,
        image_size=64,
        num_channels=3,
        hidden_size=24,
        num_attention_heads=4,
        depths=(1, 1, 1, 1),
        num_clusters=(16, 8, 4, 2),
        num_labels=3,
        superpixel_cell=16,
        **config_overrides,
    ):
        self.batch_size = batch_size
        self.image_size = image_size
        self.num_channels = num_channels
        self.superpixel_cell = superpixel_cell
        self.config_kwargs = dict(
            hidden_size=hidden_size,
            num_attention_heads=num_attention_heads,
            depths=tuple(depths),
            num_clusters=tuple(num_clusters),
            image_size=image_size,
            num_channels=num_channels,
            num_labels=num_labels,
            **config_overrides,
        )

    # -- configs and models ---------------------------------------------------------------------------------------

    def get_config_kwargs(self, **overrides):
        """The config's keyword arguments (a new dict), `overrides` applied; a value `CONFIG_DEFAULT` drops the key
        (CastConfig's own default then applies; None is passed on as a value)."""
        values = {**self.config_kwargs, **overrides}
        return {name: value for name, value in values.items() if value is not CONFIG_DEFAULT}

    def get_config(self, **overrides):
        return CastConfig(**self.get_config_kwargs(**overrides))

    def config_overrides(self, *extra, names=ARCHITECTURE, **overrides):
        """The tiny architecture as `key=value` strings (the training scripts' `--config_overrides`, the converter's
        `parse_overrides`): `names` of the config kwargs, `overrides` applied, then the `extra` strings."""
        values = self.get_config_kwargs(**overrides)
        return [f"{name}={override_text(values[name])}" for name in names] + list(extra)

    def get_hierarchical_config(self, **overrides):
        """The tiny config with the species -> genus -> family taxonomy (6 -> 3 -> 2) of `TAXONOMY`."""
        return self.get_config(**{**TAXONOMY, "num_labels": CONFIG_DEFAULT, **overrides})

    def create_model(self, model_class=CastModel, config=None, seed=0, train=False, **overrides):
        """`model_class` on `config` (default: `get_config(**overrides)`), weights drawn after `manual_seed(seed)`,
        in eval mode unless `train`."""
        config = self.get_config(**overrides) if config is None else config
        torch.manual_seed(seed)
        model = model_class(config)
        return model.train() if train else model.eval()

    def get_image_processor(self, **overrides):
        """A CastImageProcessor giving `image_size` square inputs (resize and crop to it), `overrides` applied."""
        size = {"height": self.image_size, "width": self.image_size}
        return CastImageProcessor(**{"size": size, "crop_size": dict(size), **overrides})

    # -- inputs ---------------------------------------------------------------------------------------------------

    def prepare_inputs(self, seed=0, batch_size=None):
        """Deterministic inputs: normal random `pixel_values` [B, C, S, S] and the grid of `superpixel_cell` px
        superpixels [B, S, S]."""
        batch_size = self.batch_size if batch_size is None else batch_size
        generator = torch.Generator().manual_seed(seed)
        size = (batch_size, self.num_channels, self.image_size, self.image_size)
        pixel_values = torch.randn(*size, generator=generator)
        superpixels = grid_superpixels(batch_size, self.image_size, cell=self.superpixel_cell)
        return {"pixel_values": pixel_values, "superpixels": superpixels}

    def prepare_processor_inputs(self, photos=None, processor=None):
        """Inputs made the way users make them: `processor` (default `get_image_processor()`) on `photos` (default:
        `batch_size` smooth photos of 80 x 60 px), SEEDS superpixels included."""
        photos = [smooth_photo(80, 60, seed) for seed in range(self.batch_size)] if photos is None else photos
        processor = self.get_image_processor() if processor is None else processor
        return dict(processor(images=photos, return_tensors="pt"))

    def prepare_config_and_inputs(self, **overrides):
        config = self.get_config(**overrides)
        inputs = self.prepare_inputs()
        return config, inputs["pixel_values"], inputs["superpixels"]

    def num_segments(self, superpixels):
        return int(superpixels.max()) + 1

    # -- checks ---------------------------------------------------------------------------------------------------

    def check_hierarchy(self, outputs, config, superpixels):
        """The hierarchy fields every model class returns: per-level shapes, composed argmax assignments that stay
        below each level's cluster count, label maps that nest level by level."""
        batch, width, segments = superpixels.shape[0], config.hidden_size, self.num_segments(superpixels)
        tokens = [max(segments, config.num_clusters[0])] + list(config.num_clusters[:-1])
        group = None
        for level in range(4):
            clusters = config.num_clusters[level]
            assert outputs.level_hidden_states[level].shape == (batch, 1 + tokens[level], width)
            assert outputs.assignment_logits[level].shape == (batch, tokens[level], clusters)
            assert outputs.sampled_indices[level].shape == (batch, clusters)
            assert outputs.sampled_indices[level].dtype == torch.int64
            assert outputs.padding_masks[level].dtype == torch.bool
            assert outputs.hierarchy[level].shape == (batch, tokens[0])
            assert int(outputs.hierarchy[level].max()) < clusters
            argmax = outputs.assignment_logits[level].argmax(-1)
            group = argmax if group is None else torch.gather(argmax, 1, group)
            assert torch.equal(outputs.hierarchy[level], group), f"level {level} is not the composed argmax"
        maps = outputs.hierarchy_maps(superpixels)
        assert len(maps) == 5 and all(level_map.shape == superpixels.shape for level_map in maps)
        assert_hierarchy_nests(maps)

    def create_and_check_model(self, config, pixel_values, superpixels):
        model = self.create_model(CastModel, config)
        with torch.no_grad():
            outputs = model(pixel_values=pixel_values, superpixels=superpixels, output_hidden_states=True)
        batch, width = pixel_values.shape[0], config.hidden_size
        assert outputs.pooler_output.shape == (batch, width)
        assert outputs.last_hidden_state.shape == (batch, 1 + config.num_clusters[2], width)
        assert len(outputs.hidden_states) == 1 + sum(config.depths)
        self.check_hierarchy(outputs, config, superpixels)
        return model, outputs

    def create_and_check_for_image_classification(self, config, pixel_values, superpixels):
        model = self.create_model(CastForImageClassification, config)
        labels = torch.arange(pixel_values.shape[0]) % config.num_labels
        with torch.no_grad():
            outputs = model(pixel_values=pixel_values, superpixels=superpixels, labels=labels)
        assert outputs.logits.shape == (pixel_values.shape[0], config.num_labels)
        assert outputs.loss.dim() == 0 and torch.isfinite(outputs.loss)
        self.check_hierarchy(outputs, config, superpixels)
        return model, outputs

    def create_and_check_for_semantic_segmentation(self, config, pixel_values, superpixels):
        model = self.create_model(CastForSemanticSegmentation, config)
        batch, height, width = superpixels.shape
        labels = torch.arange(height * width).reshape(height, width).expand(batch, -1, -1) % config.num_labels
        with torch.no_grad():
            outputs = model(pixel_values=pixel_values, superpixels=superpixels, labels=labels)
        segments = self.num_segments(superpixels)
        assert outputs.logits.shape == (batch, config.num_labels, height, width)
        assert outputs.segment_logits.shape == (batch, max(segments, config.num_clusters[0]), config.num_labels)
        assert outputs.loss.dim() == 0 and torch.isfinite(outputs.loss)
        self.check_hierarchy(outputs, config, superpixels)
        # Full-resolution segment pooling: no superpixel is lost in the finest label map.
        assert torch.equal(outputs.hierarchy_maps(superpixels)[0], superpixels)
        return model, outputs

    def create_and_check_for_hierarchical_image_classification(self, config, pixel_values, superpixels):
        model = self.create_model(CastForHierarchicalImageClassification, config)
        batch = pixel_values.shape[0]
        labels = torch.tensor([path for _, path in zip(range(batch), config.hierarchy_paths())])
        with torch.no_grad():
            outputs = model(pixel_values=pixel_values, superpixels=superpixels, labels=labels)
        shapes = [tuple(logits.shape) for logits in outputs.logits_per_level]
        assert shapes == [(batch, classes) for classes in config.hierarchy_num_labels]
        assert outputs.logits is outputs.logits_per_level[0]
        assert outputs.loss.dim() == 0 and torch.isfinite(outputs.loss)
        # The taxonomy is a tree: every class of a level has its parent in the next level.
        for level, parents in enumerate(config.hierarchy_parents):
            assert len(parents) == config.hierarchy_num_labels[level]
            assert set(parents) == set(range(config.hierarchy_num_labels[level + 1]))
        self.check_hierarchy(outputs, config, superpixels)
        return model, outputs

    # -- folders --------------------------------------------------------------------------------------------------

    def save_model_folder(self, folder, model_class=CastModel, config=None, seed=0, processor=None, **overrides):
        """Save `create_model(model_class, config, seed, **overrides)` and its processor (default
        `get_image_processor()`) into `folder`; returns (folder, model)."""
        folder = Path(folder)
        model = self.create_model(model_class, config, seed=seed, **overrides)
        model.save_pretrained(folder)
        (self.get_image_processor() if processor is None else processor).save_pretrained(folder)
        return folder, model
