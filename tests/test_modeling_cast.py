"""CastModel / CastForImageClassification: shapes, common transformers behaviour, padding semantics, bad input."""

import pytest
import torch
from transformers import AutoModel, AutoModelForImageClassification

from hf_hierseg import CastConfig, CastForImageClassification, CastModel
from hf_hierseg.hierarchy import paint_hierarchy


def block_superpixels(batch, height, width, block=16, offset=0):
    """Square superpixels of `block` px, numbered row-major (+ offset) — a deterministic stand-in for SEEDS."""
    rows = torch.arange(height)[:, None] // block
    cols = torch.arange(width)[None, :] // block
    labels = rows * ((width + block - 1) // block) + cols + offset
    return labels.expand(batch, height, width).clone()


class CastModelTester:
    """Tiny configuration and inputs, in the style of transformers' `ViTModelTester`."""

    def __init__(
        self,
        batch_size=2,
        image_size=64,
        hidden_size=24,
        num_attention_heads=4,
        depths=(1, 1, 1, 1),
        num_clusters=(8, 4, 3, 2),
        num_labels=5,
        graph_pooling_num_heads=12,
    ):
        self.batch_size, self.image_size = batch_size, image_size
        self.config_kwargs = dict(
            hidden_size=hidden_size,
            num_attention_heads=num_attention_heads,
            depths=depths,
            num_clusters=num_clusters,
            image_size=image_size,
            num_labels=num_labels,
            graph_pooling_num_heads=graph_pooling_num_heads,
        )

    def get_config(self, **overrides):
        return CastConfig(**{**self.config_kwargs, **overrides})

    def prepare_inputs(self, seed=0):
        generator = torch.Generator().manual_seed(seed)
        pixel_values = torch.randn(self.batch_size, 3, self.image_size, self.image_size, generator=generator)
        superpixels = block_superpixels(self.batch_size, self.image_size, self.image_size)
        return {"pixel_values": pixel_values, "superpixels": superpixels}


@pytest.fixture
def tester():
    return CastModelTester()


def eval_model(cls, config):
    torch.manual_seed(0)
    return cls(config).eval()


def test_model_output_shapes(tester):
    config = tester.get_config()
    inputs = tester.prepare_inputs()
    with torch.no_grad():
        out = eval_model(CastModel, config)(**inputs, output_hidden_states=True, output_attentions=True)
    batch, width, segments = tester.batch_size, config.hidden_size, 16  # 64 px / 16 px blocks -> 4 x 4 labels
    assert out.pooler_output.shape == (batch, width)
    tokens = [segments] + list(config.num_clusters[:-1])
    for level in range(4):
        assert out.level_hidden_states[level].shape == (batch, 1 + tokens[level], width)
        assert out.assignment_logits[level].shape == (batch, tokens[level], config.num_clusters[level])
        assert out.sampled_indices[level].shape == (batch, config.num_clusters[level])
        assert out.sampled_indices[level].dtype == torch.int64
        assert out.padding_masks[level].dtype == torch.bool
        assert out.hierarchy[level].shape == (batch, segments)
        assert int(out.hierarchy[level].max()) < config.num_clusters[level]
    assert out.last_hidden_state.shape == (batch, 1 + config.num_clusters[2], width)
    assert len(out.hidden_states) == 1 + sum(config.depths)
    assert len(out.attentions) == sum(config.depths)
    assert out.attentions[0].shape == (batch, config.num_attention_heads, 1 + segments, 1 + segments)


def test_return_dict_false_gives_tuple(tester):
    model = eval_model(CastModel, tester.get_config())
    with torch.no_grad():
        as_tuple = model(**tester.prepare_inputs(), return_dict=False)
        as_dict = model(**tester.prepare_inputs())
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[1], as_dict.pooler_output)


def test_hierarchy_is_composed_argmax_and_nests(tester):
    model = eval_model(CastModel, tester.get_config())
    inputs = tester.prepare_inputs()
    with torch.no_grad():
        out = model(**inputs)
    group = out.assignment_logits[0].argmax(-1)
    assert torch.equal(out.hierarchy[0], group)
    for level in range(1, 4):
        group = torch.gather(out.assignment_logits[level].argmax(-1), 1, group)
        assert torch.equal(out.hierarchy[level], group)
    maps = out.hierarchy_maps(inputs["superpixels"])
    assert len(maps) == 5
    for fine, coarse in zip(maps[:-1], maps[1:]):
        for b in range(fine.shape[0]):
            pairs = torch.stack([fine[b].flatten(), coarse[b].flatten()], 1).unique(dim=0)
            assert len(pairs) == len(fine[b].unique()), "a fine region is split between coarse regions"


def test_save_load_round_trip(tmp_path, tester):
    model = eval_model(CastForImageClassification, tester.get_config())
    model.save_pretrained(tmp_path)
    inputs = tester.prepare_inputs()
    for loader in (CastForImageClassification, AutoModelForImageClassification):
        reloaded = loader.from_pretrained(tmp_path).eval()
        with torch.no_grad():
            torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits, atol=0, rtol=0)
    backbone = AutoModel.from_pretrained(tmp_path).eval()
    assert type(backbone) is CastModel
    with torch.no_grad():
        torch.testing.assert_close(backbone(**inputs).pooler_output, model(**inputs).pooler_output, atol=0, rtol=0)


def test_eager_equals_sdpa(tester):
    model = eval_model(CastModel, tester.get_config(hidden_size=48, num_attention_heads=4))
    inputs = tester.prepare_inputs()
    with torch.no_grad():
        model.set_attn_implementation("eager")
        eager = model(**inputs)
        model.set_attn_implementation("sdpa")
        sdpa = model(**inputs)
    torch.testing.assert_close(eager.pooler_output, sdpa.pooler_output, atol=1e-5, rtol=1e-5)
    for a, b in zip(eager.sampled_indices, sdpa.sampled_indices):
        assert torch.equal(a, b)


def partner_batch(tester):
    """Image 0 alone, and image 0 beside a partner whose labels go higher (so image 0 gets padding tokens)."""
    inputs = tester.prepare_inputs()
    alone = {k: v[:1] for k, v in inputs.items()}
    superpixels = inputs["superpixels"].clone()
    superpixels[1] = block_superpixels(1, tester.image_size, tester.image_size, offset=5)[0]
    return alone, {"pixel_values": inputs["pixel_values"], "superpixels": superpixels}


def test_original_padding_semantics_depend_on_batch_partners(tester):
    model = eval_model(CastModel, tester.get_config())
    alone, batch = partner_batch(tester)
    with torch.no_grad():
        single, together = model(**alone), model(**batch)
    assert together.padding_masks[0][0, 16:].all() and not together.padding_masks[0][0, :16].any()
    assert not torch.allclose(single.pooler_output[0], together.pooler_output[0], atol=1e-4)


def test_masked_padding_makes_images_batch_invariant(tester):
    model = eval_model(CastModel, tester.get_config(mask_padding_tokens=True))
    alone, batch = partner_batch(tester)
    with torch.no_grad():
        single, together = model(**alone), model(**batch)
    torch.testing.assert_close(single.pooler_output[0], together.pooler_output[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(single.assignment_logits[1][0], together.assignment_logits[1][0], atol=1e-5, rtol=1e-5)
    assert torch.equal(single.hierarchy[3][0], together.hierarchy[3][0, :16])


@pytest.mark.parametrize("position_embedding_type", ["sincos", "learned"])
def test_gradients_reach_every_trainable_parameter(tester, position_embedding_type):
    config = tester.get_config(position_embedding_type=position_embedding_type)
    model = CastForImageClassification(config).train()
    out = model(**tester.prepare_inputs(), labels=torch.tensor([1, 3]))
    out.loss.backward()
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(name.startswith("cast.levels.3.pooling.") for name in frozen)
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, f"no gradient reaches {name}"


@pytest.mark.parametrize("position_embedding_type", ["sincos", "learned"])
@pytest.mark.parametrize("size", [(96, 96), (64, 128), (32, 48)])
def test_other_resolutions(tester, position_embedding_type, size):
    model = eval_model(CastModel, tester.get_config(position_embedding_type=position_embedding_type))
    height, width = size
    superpixels = block_superpixels(1, height, width, block=8)
    with torch.no_grad():
        out = model(pixel_values=torch.randn(1, 3, height, width), superpixels=superpixels)
    assert out.pooler_output.shape == (1, 24) and torch.isfinite(out.pooler_output).all()
    assert out.hierarchy[0].shape[1] == max(int(superpixels.max()) + 1, 8)


def test_training_grid_uses_position_table_unchanged(tester):
    model = eval_model(CastModel, tester.get_config(position_embedding_type="learned"))
    grid = model.embeddings.position_grid(8, 8)
    torch.testing.assert_close(grid.reshape(1, 64, -1), model.embeddings.position_embeddings[:, 1:])


@pytest.mark.parametrize(
    "problem_type,labels",
    [
        ("single_label_classification", torch.tensor([0, 4])),
        ("multi_label_classification", torch.tensor([[1.0, 0, 0, 1, 0], [0, 1, 0, 0, 0]])),
        ("regression", torch.randn(2, 5)),
    ],
)
def test_classification_losses(tester, problem_type, labels):
    model = eval_model(CastForImageClassification, tester.get_config(problem_type=problem_type))
    out = model(**tester.prepare_inputs(), labels=labels)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    reference = {
        "single_label_classification": lambda: torch.nn.functional.cross_entropy(out.logits, labels),
        "multi_label_classification": lambda: torch.nn.functional.binary_cross_entropy_with_logits(out.logits, labels),
        "regression": lambda: torch.nn.functional.mse_loss(out.logits, labels),
    }[problem_type]()
    torch.testing.assert_close(out.loss, reference)


def test_gradient_checkpointing_matches(tester):
    config = tester.get_config(pooling_dropout_prob=0.0)
    model = CastForImageClassification(config).train()
    inputs = tester.prepare_inputs()
    labels = torch.tensor([0, 1])
    loss = model(**inputs, labels=labels).loss
    loss.backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.activation_checkpointing_enable()
    model(**inputs, labels=labels).loss.backward()
    for name, grad in reference.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, atol=1e-5, rtol=1e-4)


# --- unusual but legitimate input ---------------------------------------------------------------------------


def test_one_segment_per_image(tester):
    model = eval_model(CastModel, tester.get_config())
    inputs = tester.prepare_inputs()
    inputs["superpixels"] = torch.zeros_like(inputs["superpixels"])
    with torch.no_grad():
        out = model(**inputs)
    assert torch.isfinite(out.pooler_output).all()
    # Token 0 is the only real segment; the rest pad up to the first level's cluster count.
    assert out.padding_masks[0].shape == (2, 8) and out.padding_masks[0][:, 1:].all()
    assert torch.equal(out.sampled_indices[0][:, 0], torch.zeros(2, dtype=torch.long))
    assert all(len(set(row.tolist())) == row.numel() for row in out.sampled_indices[0])


def test_blank_image_fewer_segments_than_clusters(tester):
    model = eval_model(CastModel, tester.get_config(num_clusters=(12, 6, 3, 2)))
    superpixels = block_superpixels(1, 64, 64, block=32)  # 4 segments, 12 clusters at level 1
    with torch.no_grad():
        out = model(pixel_values=torch.zeros(1, 3, 64, 64), superpixels=superpixels)
    assert out.assignment_logits[0].shape == (1, 12, 12)
    assert torch.isfinite(out.pooler_output).all()


def test_non_consecutive_labels(tester):
    model = eval_model(CastModel, tester.get_config())
    inputs = tester.prepare_inputs()
    sparse = inputs["superpixels"] * 3  # ids 0, 3, 6, ...: absent ids become padding tokens
    with torch.no_grad():
        out = model(pixel_values=inputs["pixel_values"], superpixels=sparse)
    assert out.padding_masks[0].shape[1] == int(sparse.max()) + 1
    assert out.padding_masks[0][:, 1::3].all() and not out.padding_masks[0][:, ::3].any()
    maps = paint_hierarchy(out.hierarchy, sparse)
    assert torch.equal(maps[0], sparse)


# --- bad input ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda x, y: (x, y[:, :32]), "does not match the images"),
        (lambda x, y: (x, y.float()), "integer labels"),
        (lambda x, y: (x, y - 1), "non-negative"),
        (lambda x, y: (x[0], y), "4-D tensor"),
        (lambda x, y: (x[:, :2], y), "channels"),
        (lambda x, y: (x.permute(0, 2, 3, 1), y), "channels"),
        (lambda x, y: (x[..., :60, :60], y[..., :60, :60]), "multiple of the patch size"),
        (lambda x, y: (x, None), "both"),
        (lambda x, y: (x, y.numpy()), "integer tensor"),
        (lambda x, y: (x.long(), y), "float tensor"),
        (lambda x, y: (x, y + 64 * 64), "consecutive"),
    ],
)
def test_bad_input_is_named(tester, change, message):
    model = eval_model(CastModel, tester.get_config())
    inputs = tester.prepare_inputs()
    pixel_values, superpixels = change(inputs["pixel_values"], inputs["superpixels"])
    with pytest.raises(ValueError, match=message):
        model(pixel_values=pixel_values, superpixels=superpixels)
