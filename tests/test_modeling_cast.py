"""CastModel / CastForImageClassification: shapes, common transformers behaviour, padding semantics, bad input."""

import dataclasses
import logging

import pytest
import torch
from transformers import AutoModel, AutoModelForImageClassification
from transformers.utils.logging import warning_once

from hf_hierseg import CastForImageClassification, CastModel
from hf_hierseg.hierarchy import paint_hierarchy
from hf_hierseg.segment_ops import relabel_consecutive, unused_label_counts

from cast_testing import CastModelTester, assert_hierarchy_nests, grid_superpixels


@pytest.fixture
def tester():
    # 16 segments (the 16 px grid) pooled to 8 -> 4 -> 3 -> 2 clusters; graph pooling with 12 heads (the default).
    return CastModelTester(num_clusters=(8, 4, 3, 2), num_labels=5, graph_pooling_num_heads=12)


def test_model_output_shapes(tester):
    config = tester.get_config()
    inputs = tester.prepare_inputs()
    with torch.no_grad():
        out = tester.create_model(CastModel, config)(**inputs, output_hidden_states=True, output_attentions=True)
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


def test_model(tester):
    tester.create_and_check_model(*tester.prepare_config_and_inputs())


def test_for_image_classification(tester):
    tester.create_and_check_for_image_classification(*tester.prepare_config_and_inputs())


def test_for_semantic_segmentation(tester):
    config, pixel_values, superpixels = tester.prepare_config_and_inputs(freeze_last_pooling=False)
    tester.create_and_check_for_semantic_segmentation(config, pixel_values, superpixels)


def test_for_hierarchical_image_classification(tester):
    _, pixel_values, superpixels = tester.prepare_config_and_inputs()
    config = tester.get_hierarchical_config()
    tester.create_and_check_for_hierarchical_image_classification(config, pixel_values, superpixels)


def test_with_processor_superpixels(tester):
    """The same checks on the processor's SEEDS superpixels of smooth photos (irregular segments)."""
    inputs = tester.prepare_processor_inputs()
    config = tester.get_config()
    tester.create_and_check_model(config, inputs["pixel_values"], inputs["superpixels"])
    tester.create_and_check_for_semantic_segmentation(config, inputs["pixel_values"], inputs["superpixels"])


def test_return_dict_false_gives_tuple(tester):
    model = tester.create_model(CastModel, tester.get_config())
    with torch.no_grad():
        as_tuple = model(**tester.prepare_inputs(), return_dict=False)
        as_dict = model(**tester.prepare_inputs())
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[1], as_dict.pooler_output)


def test_hierarchy_is_composed_argmax_and_nests(tester):
    model = tester.create_model(CastModel, tester.get_config())
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
    assert_hierarchy_nests(maps)


def test_save_load_round_trip(tmp_path, tester):
    model = tester.create_model(CastForImageClassification, tester.get_config())
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
    model = tester.create_model(CastModel, tester.get_config(hidden_size=48, num_attention_heads=4))
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
    superpixels[1] = grid_superpixels(1, tester.image_size, offset=5)[0]
    return alone, {"pixel_values": inputs["pixel_values"], "superpixels": superpixels}


def test_original_padding_semantics_depend_on_batch_partners(tester):
    model = tester.create_model(CastModel, tester.get_config())
    alone, batch = partner_batch(tester)
    with torch.no_grad():
        single, together = model(**alone), model(**batch)
    assert together.padding_masks[0][0, 16:].all() and not together.padding_masks[0][0, :16].any()
    assert not torch.allclose(single.pooler_output[0], together.pooler_output[0], atol=1e-4)


def test_masked_padding_makes_images_batch_invariant(tester):
    model = tester.create_model(CastModel, tester.get_config(mask_padding_tokens=True))
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
    model = tester.create_model(CastModel, tester.get_config(position_embedding_type=position_embedding_type))
    height, width = size
    superpixels = grid_superpixels(1, height, width, cell=8)
    with torch.no_grad():
        out = model(pixel_values=torch.randn(1, 3, height, width), superpixels=superpixels)
    assert out.pooler_output.shape == (1, 24) and torch.isfinite(out.pooler_output).all()
    assert out.hierarchy[0].shape[1] == max(int(superpixels.max()) + 1, 8)


def test_training_grid_uses_position_table_unchanged(tester):
    model = tester.create_model(CastModel, tester.get_config(position_embedding_type="learned"))
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
    model = tester.create_model(CastForImageClassification, tester.get_config(problem_type=problem_type))
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
    model = tester.create_model(CastModel, tester.get_config())
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
    model = tester.create_model(CastModel, tester.get_config(num_clusters=(12, 6, 3, 2)))
    superpixels = grid_superpixels(1, 64, cell=32)  # 4 segments, 12 clusters at level 1
    with torch.no_grad():
        out = model(pixel_values=torch.zeros(1, 3, 64, 64), superpixels=superpixels)
    assert out.assignment_logits[0].shape == (1, 12, 12)
    assert torch.isfinite(out.pooler_output).all()


def test_non_consecutive_labels(tester, caplog):
    model = tester.create_model(CastModel, tester.get_config())
    inputs = tester.prepare_inputs()
    sparse = inputs["superpixels"] * 3  # ids 0, 3, 6, ...: absent ids become padding tokens
    warning_once.cache_clear()  # a warning already given in this process would be given only once
    with torch.no_grad(), caplog.at_level(logging.WARNING):
        out = model(pixel_values=inputs["pixel_values"], superpixels=sparse)
    assert out.padding_masks[0].shape[1] == int(sparse.max()) + 1
    assert out.padding_masks[0][:, 1::3].all() and not out.padding_masks[0][:, ::3].any()
    maps = paint_hierarchy(out.hierarchy, sparse)
    assert torch.equal(maps[0], sparse)
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and "not consecutive" in warnings[0]
    assert "hf_hierseg.segment_ops.relabel_consecutive" in warnings[0]


def test_sparse_ids_relabelled_give_one_token_per_segment(tester, caplog):
    """100 segments numbered up to 696 would make 697 tokens; relabelled, the token count is the segment count."""
    model = tester.create_model(CastModel, tester.get_config(num_clusters=(16, 8, 4, 2)))
    generator = torch.Generator().manual_seed(0)
    ids = torch.randperm(697, generator=generator)[:100].sort().values
    ids[-1] = 696
    blocks = torch.arange(100).reshape(10, 10).repeat_interleave(8, 0).repeat_interleave(8, 1)  # 80 x 80, 8 px cells
    sparse = ids[blocks][None]  # [1, 80, 80]: 100 segments with ids up to 696
    pixel_values = torch.randn(1, 3, 80, 80, generator=generator)
    assert unused_label_counts(sparse).tolist() == [597]
    with torch.no_grad():
        wasteful = model(pixel_values=pixel_values, superpixels=sparse)
        dense_ids = relabel_consecutive(sparse)
        warning_once.cache_clear()
        with caplog.at_level(logging.WARNING):
            compact = model(pixel_values=pixel_values, superpixels=dense_ids)
    assert not [record for record in caplog.records if "not consecutive" in record.getMessage()]
    assert unused_label_counts(dense_ids).tolist() == [0]
    assert wasteful.padding_masks[0].shape == (1, 697) and int(wasteful.padding_masks[0].sum()) == 597
    assert compact.padding_masks[0].shape == (1, 100) and not compact.padding_masks[0].any()
    # The real segments' level-1 embeddings are the same tokens, in the same order, only without the padding.
    with torch.no_grad():
        wasteful_embeddings, _, _ = model.embeddings(pixel_values, sparse)
        compact_embeddings, _, _ = model.embeddings(pixel_values, dense_ids)
    torch.testing.assert_close(wasteful_embeddings[:, 1 + ids], compact_embeddings[:, 1:], atol=1e-6, rtol=1e-6)


def test_unused_label_counts_per_image():
    maps = torch.tensor([[[0, 1], [2, 3]], [[0, 5], [5, 2]], [[4, 4], [4, 4]]])
    assert unused_label_counts(maps).tolist() == [0, 3, 4]
    assert unused_label_counts(relabel_consecutive(maps)).tolist() == [0, 0, 0]


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
    model = tester.create_model(CastModel, tester.get_config())
    inputs = tester.prepare_inputs()
    pixel_values, superpixels = change(inputs["pixel_values"], inputs["superpixels"])
    with pytest.raises(ValueError, match=message):
        model(pixel_values=pixel_values, superpixels=superpixels)


# --- outputs: one hierarchy base, hidden states and attentions through transformers' output recording -------------


def test_every_output_class_shares_the_hierarchy_base(tester):
    from hf_hierseg.modeling_cast import (
        CastForSelfSupervisedPretraining,
        CastForSemanticSegmentation,
        CastHierarchyOutput,
        CastImageClassifierOutput,
        CastModelOutput,
        CastSelfSupervisedOutput,
        CastSemanticSegmenterOutput,
    )

    hierarchy_fields = ["level_hidden_states", "pooled_hidden_states", "assignment_logits", "sampled_indices"]
    hierarchy_fields += ["padding_masks", "hierarchy"]
    classes = [CastModelOutput, CastImageClassifierOutput, CastSelfSupervisedOutput, CastSemanticSegmenterOutput]
    for output_class in classes:
        assert issubclass(output_class, CastHierarchyOutput)
        assert output_class.hierarchy_maps is CastHierarchyOutput.hierarchy_maps  # declared once, not overridden
        declared_here = set(vars(output_class).get("__annotations__", {}))
        assert not declared_here & set(hierarchy_fields), f"{output_class.__name__} re-declares hierarchy fields"
        names = [field.name for field in dataclasses.fields(output_class)]
        assert set(hierarchy_fields) <= set(names), output_class.__name__
    # Every head returns its backbone's hierarchy, the same tensors CastModel computes with the same weights.
    config = tester.get_config(projection_dim=8, projection_hidden_dim=16)
    inputs = tester.prepare_inputs()
    for head_class in (CastForImageClassification, CastForSelfSupervisedPretraining, CastForSemanticSegmentation):
        head = tester.create_model(head_class, config)
        with torch.no_grad():
            head_out = head(**inputs)
            base_out = head.cast(**inputs)
        for name in hierarchy_fields:
            for got, expected in zip(getattr(head_out, name), getattr(base_out, name)):
                assert torch.equal(got, expected), (head_class.__name__, name)


def test_hidden_states_are_the_embeddings_then_every_block(tester):
    model = tester.create_model(CastModel, tester.get_config(depths=(2, 1, 1, 1)))
    inputs = tester.prepare_inputs()
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
        embeddings, _, _ = model.embeddings(**inputs)
    assert len(out.hidden_states) == 1 + 5
    torch.testing.assert_close(out.hidden_states[0], embeddings, atol=0, rtol=0)
    ends = [2, 3, 4, 5]  # the last block of each level
    for level, end in enumerate(ends):
        torch.testing.assert_close(out.hidden_states[end], out.level_hidden_states[level], atol=0, rtol=0)
    # Not tied to the final-normed last_hidden_state: hidden_states[-1] is the last block's output.
    assert not torch.allclose(out.hidden_states[-1], out.last_hidden_state)


def test_hidden_states_with_a_level_without_blocks(tester):
    model = tester.create_model(CastModel, tester.get_config(depths=(1, 0, 1, 1)))
    inputs = tester.prepare_inputs()
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
        embeddings, _, _ = model.embeddings(**inputs)
    assert len(out.hidden_states) == 1 + 3
    torch.testing.assert_close(out.hidden_states[0], embeddings, atol=0, rtol=0)
    # Level 2 has no blocks: its tokens are level 1's pooled tokens, and the next recorded state is level 3's block.
    torch.testing.assert_close(out.level_hidden_states[1], out.pooled_hidden_states[0], atol=0, rtol=0)
    torch.testing.assert_close(out.hidden_states[2], out.level_hidden_states[2], atol=0, rtol=0)


def test_selected_hidden_states_and_config_default(tester):
    model = tester.create_model(CastModel, tester.get_config())
    inputs = tester.prepare_inputs()
    with torch.no_grad():
        everything = model(**inputs, output_hidden_states=True).hidden_states
        selected = model(**inputs, output_hidden_states=[0, -1]).hidden_states
        assert model(**inputs).hidden_states is None
        model.config.output_hidden_states = True
        from_config = model(**inputs).hidden_states
    assert len(selected) == len(everything) == 5
    assert torch.equal(selected[0], everything[0]) and torch.equal(selected[-1], everything[-1])
    assert all(state is None for state in selected[1:-1])
    assert all(torch.equal(a, b) for a, b in zip(from_config, everything))


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_attentions_are_the_vit_blocks_only(tester, attn_implementation):
    """Graph pooling's centroid attention (a CastSelfAttention with 12 heads here) is not recorded; each recorded
    map is softmax(q k^T / sqrt(d)) of its block's input, in block order."""
    config = tester.get_config(depths=(2, 1, 1, 1))
    model = tester.create_model(CastModel, config)
    model.set_attn_implementation(attn_implementation)
    inputs = tester.prepare_inputs()
    with torch.no_grad():
        out = model(**inputs, output_attentions=True, output_hidden_states=True)
    blocks, block_inputs, recorded = [], [], 0
    for level, cast_level in enumerate(model.levels):
        current = out.hidden_states[0] if level == 0 else out.pooled_hidden_states[level - 1]
        for block in cast_level.blocks:
            blocks.append(block)
            block_inputs.append(current)
            recorded += 1
            current = out.hidden_states[recorded]
    assert len(out.attentions) == len(blocks) == 5
    for block, block_input, weights in zip(blocks, block_inputs, out.attentions):
        batch, length, _ = block_input.shape
        assert weights.shape == (batch, config.num_attention_heads, length, length)
        with torch.no_grad():
            qkv = block.attn.qkv(block.norm1(block_input)).reshape(batch, length, 3, 4, -1).permute(2, 0, 3, 1, 4)
            expected = (qkv[0] @ qkv[1].transpose(-1, -2) * block.attn.scaling).softmax(-1)
        torch.testing.assert_close(weights, expected, atol=1e-6, rtol=1e-5)


def test_heads_return_tuples_and_pass_recording_on(tester):
    from hf_hierseg.modeling_cast import CastForSelfSupervisedPretraining

    config = tester.get_config(projection_dim=8, projection_hidden_dim=16)
    inputs = tester.prepare_inputs()
    classifier = tester.create_model(CastForImageClassification, config)
    with torch.no_grad():
        out = classifier(**inputs, output_hidden_states=True, output_attentions=True)
        as_tuple = classifier(**inputs, return_dict=False)
    assert len(out.hidden_states) == 5 and len(out.attentions) == 4
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], out.logits, atol=1e-5, rtol=1e-5)  # sdpa there, eager here
    moco = tester.create_model(CastForSelfSupervisedPretraining, config)
    with torch.no_grad():
        moco_out = moco(**inputs, output_hidden_states=True)
    assert len(moco_out.hidden_states) == 5 and moco_out.predictions.shape == (2, 8)


def test_encoder_is_the_levels_module_list(tester):
    from hf_hierseg.modeling_cast import CastEncoder, CastLevel

    model = CastModel(tester.get_config())
    assert isinstance(model.levels, CastEncoder) and len(model.levels) == 4
    assert all(isinstance(level, CastLevel) for level in model.levels)
    first_two = model.levels[:2]
    assert list(first_two) == [model.levels[0], model.levels[1]]
    assert all(name.startswith(("embeddings.", "levels.", "layernorm.")) for name in model.state_dict())


def test_input_embeddings_are_the_conv_stem(tester):
    from hf_hierseg.modeling_cast import CastBackbone, CastConvStem

    config = tester.get_config()
    for model_class in (CastModel, CastForImageClassification, CastBackbone):
        assert isinstance(model_class(config).get_input_embeddings(), CastConvStem), model_class.__name__


# --- weights: meta-device init, the bundled model ------------------------------------------------------------------


@pytest.mark.parametrize("model_class_name", ["CastModel", "CastBackbone", "CastForSemanticSegmentation"])
def test_from_pretrained_recreates_the_sincos_table(tmp_path, tester, model_class_name):
    """The sin-cos table is a non-persistent buffer: from_pretrained (meta-device init) rebuilds it in _init_weights."""
    import hf_hierseg.modeling_cast as modeling

    model_class = getattr(modeling, model_class_name)
    config = tester.get_config()
    model_class(config).save_pretrained(tmp_path)
    loaded = model_class.from_pretrained(tmp_path)
    embeddings = loaded.embeddings if hasattr(loaded, "embeddings") else loaded.cast.embeddings
    expected = modeling.sincos_position_grid(8, 8, config.hidden_size)
    assert embeddings.position_embeddings.device.type == "cpu"
    torch.testing.assert_close(embeddings.position_embeddings, expected, atol=0, rtol=0)


def test_bundled_default_model_loads_without_missing_or_unexpected_keys(caplog):
    from hf_hierseg.default_model import default_model_path
    from hf_hierseg.modeling_cast import CastBackbone

    transformers_logger = logging.getLogger("transformers")  # does not propagate to the root logger
    transformers_logger.addHandler(caplog.handler)
    try:
        for model_class in (CastModel, CastBackbone, CastForImageClassification):
            caplog.clear()
            with caplog.at_level(logging.WARNING):
                model, info = model_class.from_pretrained(default_model_path(), output_loading_info=True)
            warnings = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
            if model_class is CastForImageClassification:  # the check can fail: a head that is not saved is missing
                assert info["missing_keys"] == {"classifier.weight", "classifier.bias"} and warnings
                continue
            assert not any(info.values()), (model_class.__name__, info)
            assert not warnings, (model_class.__name__, warnings)
    finally:
        transformers_logger.removeHandler(caplog.handler)


# --- the ConvStem: the Sequential in training, BatchNorm folded and cached in eval ----------------------------------


def conv_stem(tester, seed=0):
    """A ConvStem whose BatchNorms have non-trivial statistics and affine parameters."""
    from hf_hierseg.modeling_cast import CastConvStem

    torch.manual_seed(seed)
    stem = CastConvStem(tester.get_config())
    with torch.no_grad():
        for norm in stem.proj[1:-1:3]:
            norm.running_mean.uniform_(-0.5, 0.5)
            norm.running_var.uniform_(0.5, 2.0)
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    return stem.eval()


def sequential_reference(stem, pixel_values):
    """The stem computed by its nn.Sequential as written (eval-mode BatchNorm modules, the 1x1 conv as a conv)."""
    with torch.no_grad():
        return stem.proj(pixel_values).permute(0, 2, 3, 1)


def stem_input(seed=1):
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_conv_stem_eval_folds_batch_norm_once(tester):
    stem, pixel_values = conv_stem(tester), stem_input()
    with torch.no_grad():
        first = stem(pixel_values)
        cache = stem._folded
        second = stem(pixel_values)
    assert cache is not None and stem._folded is cache  # computed once, reused
    assert torch.equal(first, second) and first.shape == (2, 4, 4, 24)
    torch.testing.assert_close(first, sequential_reference(stem, pixel_values), atol=1e-5, rtol=1e-5)
    # The cached folding is exactly the one computed in the graph when gradients are on.
    assert torch.equal(stem(pixel_values), first)


@pytest.mark.parametrize("full_resolution", [False, True])
def test_segment_tokens_project_the_means_as_the_original_averages_projected_cells(tester, full_resolution):
    """The embeddings average the stem's convolutions per segment and then apply its 1x1 projection (linear, so the
    two commute): tokens equal the original's order (project every cell, then average), absent labels stay zero."""
    from hf_hierseg.modeling_cast import CastEmbeddings
    from hf_hierseg.segment_ops import resize_labels_nearest, segment_mean

    config = tester.get_config()
    torch.manual_seed(0)
    embeddings = CastEmbeddings(config, pool_at_full_resolution=full_resolution).eval()
    torch.nn.init.normal_(embeddings.patch_embeddings.proj[-1].bias)
    pixel_values, superpixels = tester.prepare_inputs()["pixel_values"], grid_superpixels(2, 64, cell=8) % 40
    superpixels[1] = superpixels[1] % 24  # labels 24..39 are absent from image 1
    with torch.no_grad():
        tokens, padding_mask, _ = embeddings(pixel_values, superpixels)
        stem = embeddings.patch_embeddings(pixel_values)  # [B, 8, 8, C]: projected on every cell
        if full_resolution:
            labels = superpixels
            stem = torch.nn.functional.interpolate(stem.permute(0, 3, 1, 2), size=(64, 64), mode="bilinear")
            stem = stem.permute(0, 2, 3, 1)
        else:
            labels = resize_labels_nearest(superpixels, (8, 8))
        cells = stem + embeddings.position_grid(*labels.shape[-2:])
        expected, _ = segment_mean(cells.flatten(1, 2), labels.flatten(1), 40)
    assert bool(padding_mask[1, 24:].all()) and not bool(padding_mask[0].any())
    torch.testing.assert_close(tokens[:, 1:], expected, atol=1e-5, rtol=1e-5)
    assert bool((tokens[1, 1 + 24 :] == 0).all())  # no bias on absent labels


def test_conv_stem_keeps_channels_last(tester, monkeypatch):
    stem, pixel_values = conv_stem(tester), stem_input()
    layouts = []
    conv2d = torch.nn.functional.conv2d

    def recording_conv2d(input, *args, **kwargs):
        layouts.append(input.is_contiguous(memory_format=torch.channels_last))
        return conv2d(input, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "conv2d", recording_conv2d)
    with torch.no_grad():
        stem(pixel_values)  # eval: folded convolutions
        stem.train()
        stem(pixel_values)  # training: the Sequential's Conv2d modules
    assert layouts == [True] * 8


def test_conv_stem_training_runs_the_sequential(tester):
    stem, pixel_values = conv_stem(tester), stem_input()
    with torch.no_grad():
        stem(pixel_values)
    stem.train()
    assert stem._folded is None  # train() drops the cache
    norm = stem.proj[1]
    before = norm.running_mean.clone()
    out = stem(pixel_values)
    assert not torch.equal(norm.running_mean, before)  # the BatchNorm modules ran, with batch statistics
    layers = list(stem.proj)
    hidden = pixel_values
    with torch.no_grad():
        for layer in layers[:-1]:
            hidden = (
                layer(hidden) if not isinstance(layer, torch.nn.BatchNorm2d) else batch_statistics_norm(layer, hidden)
            )
        expected = torch.nn.functional.linear(
            hidden.permute(0, 2, 3, 1), layers[-1].weight.flatten(1), layers[-1].bias
        )
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def batch_statistics_norm(norm, hidden):
    """Training-mode batch norm with batch statistics, without touching the module's running statistics."""
    return torch.nn.functional.batch_norm(hidden, None, None, norm.weight, norm.bias, training=True, eps=norm.eps)


def test_conv_stem_cache_follows_an_optimizer_step_in_eval_mode(tester):
    stem, pixel_values = conv_stem(tester), stem_input()
    with torch.no_grad():
        stale = stem(pixel_values)
    optimizer = torch.optim.SGD(stem.parameters(), lr=0.5)
    out = stem(pixel_values)  # eval mode with gradients: folded in the graph
    assert out.requires_grad
    out.square().mean().backward()
    assert stem.proj[0].weight.grad.abs().sum() > 0 and stem.proj[1].weight.grad.abs().sum() > 0
    optimizer.step()
    with torch.no_grad():
        fresh = stem(pixel_values)
    assert not torch.allclose(fresh, stale)
    torch.testing.assert_close(fresh, sequential_reference(stem, pixel_values), atol=1e-5, rtol=1e-5)


def test_conv_stem_cache_follows_load_state_dict_and_dtype(tester):
    stem, other, pixel_values = conv_stem(tester, seed=0), conv_stem(tester, seed=1), stem_input()
    with torch.no_grad():
        stem(pixel_values)
        stem.load_state_dict(other.state_dict())
        torch.testing.assert_close(stem(pixel_values), other(pixel_values), atol=0, rtol=0)
        stem.double()
        out = stem(pixel_values.double())
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, sequential_reference(stem, pixel_values.double()), atol=1e-10, rtol=1e-10)


def test_conv_stem_cache_follows_running_statistics_updated_in_training(tester):
    stem, pixel_values = conv_stem(tester), stem_input()
    with torch.no_grad():
        stem(pixel_values)
        stem.train()
        stem(pixel_values * 3 + 1)  # updates the running statistics
        stem.eval()
        out = stem(pixel_values)
    torch.testing.assert_close(out, sequential_reference(stem, pixel_values), atol=1e-5, rtol=1e-5)


def test_conv_stem_cache_built_in_inference_mode(tester):
    stem, pixel_values = conv_stem(tester), stem_input()
    with torch.inference_mode():
        inside = stem(pixel_values)
    with torch.no_grad():
        outside = stem(pixel_values)
    torch.testing.assert_close(inside, outside, atol=0, rtol=0)
    out = stem(pixel_values.requires_grad_())  # with gradients the cache (inference tensors) is not used
    out.sum().backward()
    assert pixel_values.grad is not None
