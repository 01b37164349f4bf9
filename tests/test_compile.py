"""torch.compile with a static token budget: one graph without breaks (`fullgraph=True`) that equals eager mode and
serves every batch size. Dynamo's tracing (backend "eager") is checked by default; AOT tracing and Inductor, which
take minutes on a small CPU, are `slow`."""

import pytest
import torch
from test_static_shapes import BUDGET, TESTER, inputs

from hf_hierseg import (
    CastForHierarchicalImageClassification,
    CastForImageClassification,
    CastForSemanticSegmentation,
    CastModel,
)
from hf_hierseg.graph_pooling import farthest_point_sampling, farthest_point_sampling_direct
from hf_hierseg.modeling_cast import dynamic_batch_compilation


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def main_output(output):
    return output.logits if getattr(output, "logits", None) is not None else output.pooler_output


def check_compiled(model, backend, batch_sizes=(1, 3, 2, 17)):
    """Compile once (batch 2, dynamic), then every batch size without recompiling: outputs equal eager mode."""
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    pixel_values, superpixels = inputs(2)
    with torch.no_grad(), dynamic_batch_compilation(pixel_values, superpixels):
        compiled(pixel_values, superpixels)
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        for batch in batch_sizes:
            pixel_values, superpixels = inputs(batch, seed=batch)
            output, expected = compiled(pixel_values, superpixels), model(pixel_values, superpixels)
            torch.testing.assert_close(main_output(output), main_output(expected), atol=1e-4, rtol=1e-4)
            for got, want in zip(output.sampled_indices, expected.sampled_indices):
                assert torch.equal(got, want)
            for got, want in zip(output.hierarchy, expected.hierarchy):
                assert torch.equal(got, want)
            assert output.level_hidden_states[0].shape[:2] == (batch, 1 + BUDGET)


def static_model(model_class, **overrides):
    return TESTER.create_model(model_class, num_segment_tokens=BUDGET, **overrides)


def test_model_compiles_fullgraph_for_every_batch_size():
    check_compiled(static_model(CastModel), backend="eager")


@pytest.mark.slow
@pytest.mark.parametrize(
    "model_class", [CastForImageClassification, CastForSemanticSegmentation, CastForHierarchicalImageClassification]
)
def test_heads_compile_fullgraph(model_class):
    overrides = {}
    if model_class is CastForHierarchicalImageClassification:
        overrides = dict(hierarchy_num_labels=(5, 2), hierarchy_parents=((0, 0, 1, 1, 1),))
    check_compiled(static_model(model_class, **overrides), backend="eager", batch_sizes=(1, 3))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_model_compiles_with_aot_and_inductor(backend):
    check_compiled(static_model(CastModel), backend=backend, batch_sizes=(1, 3))


def test_farthest_point_sampling_compiles_with_exact_ties():
    """The exact fallback is selected branch-free: rows with ties (duplicated points) and rows without both match the
    eager picks and the direct computation."""
    generator = torch.Generator().manual_seed(0)
    points = torch.randn(3, 12, 5, generator=generator, dtype=torch.float64)
    points[1, 6:] = points[1, :6]  # every point twice: ties at every step
    points[2, 3:] = points[2, 0]  # mostly one point: zero distances
    compiled = torch.compile(farthest_point_sampling, fullgraph=True, backend="eager", dynamic=False)
    expected = farthest_point_sampling_direct(points, 8)
    assert torch.equal(farthest_point_sampling(points, 8), expected)
    assert torch.equal(compiled(points, 8), expected)
    assert len(set(expected[2].tolist())) == 8  # chosen points are never picked again
