"""ONNX export (`hf_hierseg.export`, `hf-hierseg export-onnx`): ONNX Runtime equals the PyTorch model on real photos
(a tiny classifier and the bundled default model, batch 1 and 3 from one export), named outputs, clear errors."""

import sys

import numpy as np
import pytest
import torch

from hf_hierseg import CastForImageClassification
from hf_hierseg.cli import main
from hf_hierseg.errors import InvalidInputError, MissingDependencyError, MissingInputError
from hf_hierseg.export import (
    OnnxCastRunner,
    export_cast_onnx,
    named_output_tensors,
    static_budget_model,
    suggested_num_segment_tokens,
)

from cast_testing import CastModelTester


pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

FLOAT_FIELDS = ("pooler_output", "last_hidden_state", "logits", "level_hidden_states", "pooled_hidden_states")
INTEGER_FIELDS = ("hierarchy", "sampled_indices", "padding_masks")
ATOL = 1e-4


@pytest.fixture(scope="module")
def photos():
    from hf_hierseg.apps.demo import real_demo_photos
    from hf_hierseg.evaluation.real_photos import RealPhotosUnavailableError

    try:
        return [image for _, image in real_demo_photos(download=False)]
    except RealPhotosUnavailableError as error:
        pytest.skip(f"real photos unavailable (no cached wheel): {error}")


TESTER = CastModelTester(num_labels=5, graph_pooling_num_heads=4)


def tiny_processor():
    return TESTER.get_image_processor(size={"shortest_edge": 64}, num_superpixels=49)


def tiny_classifier(num_segment_tokens=40):
    return TESTER.create_model(CastForImageClassification, num_segment_tokens=num_segment_tokens)


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.onnx"
    model, processor = tiny_classifier(), tiny_processor()
    onnx_config = export_cast_onnx(model, path, processor=processor)
    return model, processor, path, onnx_config


@pytest.fixture(scope="module")
def default_export(tmp_path_factory):
    """The bundled default model exported by the command line, without --model and --num-segment-tokens."""
    from hf_hierseg.default_model import load_default

    path = tmp_path_factory.mktemp("default") / "onnx" / "default.onnx"
    assert main(["export-onnx", "--output", str(path), "--no-check"]) == 0
    model, processor = load_default()
    return static_budget_model(model, suggested_num_segment_tokens(processor, model.config)), processor, path


def assert_same_tokens(actual, expected, level_tokens):
    """Indices (FPS seeds, or groups of the hierarchy) equal, or, where they differ, naming duplicate tokens (an
    exact tie: untrained tiny weights give some clusters the same token), which nothing downstream tells apart."""
    tokens = level_tokens[:, 1:].numpy()  # [B, N, C], CLS dropped
    for image, position in zip(*np.nonzero(actual != expected)):
        np.testing.assert_allclose(
            tokens[image, actual[image, position]], tokens[image, expected[image, position]], atol=ATOL, rtol=0
        )


def assert_parity(model, processor, runner, images, strict=True):
    """ONNX Runtime == eager: floats within ATOL, integer outputs equal (with strict=False: up to duplicate
    tokens, see `assert_same_tokens`)."""
    processed = processor(images, return_tensors="pt")
    with torch.no_grad():
        expected = dict(named_output_tensors(model(processed["pixel_values"], processed["superpixels"])))
    flat = runner.run(grouped=False, pixel_values=processed["pixel_values"], superpixels=processed["superpixels"])
    assert set(flat) == set(expected)
    for name, value in flat.items():
        reference = expected[name].numpy()
        assert value.shape == reference.shape, name
        if name.startswith("sampled_indices.") and not strict:
            assert_same_tokens(value, reference, expected[name.replace("sampled_indices", "level_hidden_states")])
        elif name.startswith("hierarchy.") and not strict:
            assert_same_tokens(value, reference, expected[name.replace("hierarchy", "pooled_hidden_states")])
        elif name.split(".")[0] in INTEGER_FIELDS:
            np.testing.assert_array_equal(value, reference, err_msg=name)
        elif name.split(".")[0] in FLOAT_FIELDS:
            np.testing.assert_allclose(value, reference, atol=ATOL, rtol=0, err_msg=name)
    # The processor's path gives the same as processed inputs, grouped per level as in the model output.
    grouped = runner(images)
    assert len(grouped["hierarchy"]) == 4
    for level, values in enumerate(grouped["hierarchy"]):
        np.testing.assert_array_equal(values, flat[f"hierarchy.{level}"])


def test_tiny_classifier_onnx_runtime_equals_eager_at_batch_1_and_3(tiny_export, photos):
    model, processor, path, onnx_config = tiny_export
    runner = OnnxCastRunner(path, num_threads=2)
    assert runner.input_names == ["pixel_values", "superpixels"]
    names = runner.output_names
    # A classifier's output has the embedding (pooler_output) and the tokens of every level, no last_hidden_state.
    for name in ("logits", "pooler_output", "level_hidden_states.3", *(f"hierarchy.{level}" for level in range(4))):
        assert name in names
    assert names == list(onnx_config.output_names) and runner.num_segment_tokens == 40
    assert runner.session.get_inputs()[0].shape[0] == "batch_size"  # the batch axis is symbolic
    assert_parity(model, processor, runner, photos[:1], strict=False)
    assert_parity(model, processor, runner, photos[:3], strict=False)


def test_onnx_runner_threads_may_sleep_when_idle(tiny_export):
    """ONNX Runtime's idle threads spin by default; `allow_spinning=False` (the benchmark's, which times PyTorch
    right after ONNX Runtime in one process) lets them sleep."""
    path = tiny_export[2]
    key = "session.intra_op.allow_spinning"
    assert OnnxCastRunner(path).session.get_session_options().get_session_config_entry(key) == "1"
    sleeping = OnnxCastRunner(path, num_threads=2, allow_spinning=False)
    assert sleeping.session.get_session_options().get_session_config_entry(key) == "0"


def test_default_model_by_the_command_line(default_export, photos):
    model, processor, path = default_export
    assert (path.parent / "preprocessor_config.json").is_file() and (path.parent / "config.json").is_file()
    runner = OnnxCastRunner(path)  # reads the processor written beside the graph
    settings = {
        key: value
        for key, value in runner.processor.to_dict().items()
        if key not in ("auto_map", "num_segment_tokens")
    }
    assert settings == processor.to_dict() and runner.processor.num_segment_tokens == model.config.num_segment_tokens
    processor = runner.processor
    assert "logits" not in runner.output_names
    assert {"pooler_output", "last_hidden_state", "hierarchy.3", "sampled_indices.0"} <= set(runner.output_names)
    assert_parity(model, processor, runner, photos[:1])
    assert_parity(model, processor, runner, photos[1:4])


@pytest.mark.slow
def test_command_line_reports_the_budget_and_checks(tmp_path, capsys):
    folder = tmp_path / "model"
    model = tiny_classifier(num_segment_tokens=None)
    model.save_pretrained(folder)
    tiny_processor().save_pretrained(folder)
    output = tmp_path / "out" / "tiny.onnx"
    assert main(["export-onnx", "--model", str(folder), "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    expected_budget = suggested_num_segment_tokens(tiny_processor(), model.config)
    assert f"exporting with {expected_budget} tokens" in printed
    assert "integer outputs " in printed  # (untrained tiny weights tie clusters: equal up to duplicates, above)
    difference = float(printed.split("largest float difference ")[1].split(";")[0])
    assert difference <= ATOL


def test_model_without_budget_is_refused_with_the_fix():
    with pytest.raises(InvalidInputError, match="num_segment_tokens=N"):
        static_budget_model(tiny_classifier(num_segment_tokens=None))
    with pytest.raises(InvalidInputError, match="below the first graph pooling"):
        static_budget_model(tiny_classifier(num_segment_tokens=None), 8)
    model = tiny_classifier(num_segment_tokens=None)
    budgeted = static_budget_model(model, 30)
    assert budgeted.config.num_segment_tokens == 30 and model.config.num_segment_tokens is None


@pytest.mark.slow
def test_processor_saved_beside_is_capped_to_the_budget(tmp_path, photos):
    """196 superpixels requested on 64 x 64 crops give up to 64 SEEDS segments; with a budget of 20 the processor
    written beside the graph asks for fewer, and ONNX Runtime still equals the model."""
    processor = TESTER.get_image_processor(size={"shortest_edge": 64}, num_superpixels=196)
    model = tiny_classifier(num_segment_tokens=20)
    export_cast_onnx(model, tmp_path / "x.onnx", processor=processor)
    runner = OnnxCastRunner(tmp_path / "x.onnx")
    assert runner.processor.num_segment_tokens == 20 and processor.num_segment_tokens is None
    processed = runner.process(photos[:2])
    assert int(processed["superpixels"].max()) < 20
    assert_parity(model, runner.processor, runner, photos[:2], strict=False)


def test_runner_rejects_labels_outside_the_budget(tiny_export):
    _, _, path, _ = tiny_export
    runner = OnnxCastRunner(path)
    pixel_values = np.zeros((1, 3, 64, 64), np.float32)
    with pytest.raises(InvalidInputError, match="0..39"):
        runner.run(pixel_values=pixel_values, superpixels=np.full((1, 64, 64), 40))
    with pytest.raises(InvalidInputError, match="exported size"):
        runner.run(pixel_values=np.zeros((1, 3, 32, 32), np.float32), superpixels=np.zeros((1, 32, 32), np.int64))


def test_command_line_errors(tmp_path, capsys):
    assert main(["export-onnx", "--model", str(tmp_path / "missing"), "--output", str(tmp_path / "a.onnx")]) == 1
    assert "export-onnx: error:" in capsys.readouterr().err
    assert main(["export-onnx", "--output", str(tmp_path / "a.txt")]) == 1
    assert ".onnx file" in capsys.readouterr().err
    with pytest.raises(MissingInputError, match="No ONNX model"):
        OnnxCastRunner(tmp_path / "missing.onnx")


def test_missing_onnx_runtime_names_the_extra(tiny_export, monkeypatch, capsys):
    _, _, path, _ = tiny_export
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError in this test
    with pytest.raises(MissingDependencyError, match=r'pip install "hf_hierseg\[onnx\]"'):
        OnnxCastRunner(path)
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    assert main(["export-onnx", "--output", str(path.parent / "b.onnx")]) == 1
    assert "hf_hierseg[onnx]" in capsys.readouterr().err
