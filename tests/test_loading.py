"""`hf_hierseg.loading`: the class each checkpoint needs, the saved image processor, and the user's mistakes named
(`hf_hierseg.errors`)."""

import pytest
import torch
from transformers import ViTConfig, ViTModel

from hf_hierseg import (
    CastForImageClassification,
    CastForSemanticSegmentation,
    CastImageProcessor,
    CastModel,
    default_model,
)
from hf_hierseg.errors import InvalidInputError, MissingInputError, UserInputError
from hf_hierseg.loading import (
    load_cast_image_processor,
    load_cast_model,
    load_model_and_processor,
    resolve_device,
    resolve_model_source,
)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, cast_tester):
    root = tmp_path_factory.mktemp("loading")
    cast_tester.save_model_folder(root / "backbone", processor=CastImageProcessor(num_superpixels=300))
    cast_tester.create_model(CastForImageClassification).save_pretrained(root / "classifier")
    cast_tester.create_model(CastForSemanticSegmentation).save_pretrained(root / "segmentation")
    ViTModel(
        ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    ).save_pretrained(root / "vit")
    return root


def test_each_checkpoint_loads_as_the_class_it_needs(folders):
    assert type(load_cast_model(folders / "backbone")) is CastModel
    assert type(load_cast_model(folders / "classifier")) is CastModel  # the backbone, unless a classifier is wanted
    classifier = load_cast_model(folders / "classifier", classifier=True)
    assert type(classifier) is CastForImageClassification and not classifier.training
    expected = CastForImageClassification.from_pretrained(folders / "classifier")
    for name, value in expected.state_dict().items():
        assert torch.equal(classifier.state_dict()[name], value), name
    for classifier_wanted in (False, True):  # a segmentation encoder differs: always its own class
        assert type(load_cast_model(folders / "segmentation", classifier_wanted)) is CastForSemanticSegmentation


def test_the_saved_processor_with_overrides_or_none(folders):
    assert load_cast_image_processor(folders / "backbone").num_superpixels == 300
    processor = load_cast_image_processor(folders / "backbone", num_superpixels=None, superpixel_method="grid")
    assert (processor.num_superpixels, processor.superpixel_method) == (300, "grid")
    assert load_cast_image_processor(folders / "classifier") is None
    model, processor = load_model_and_processor(folders / "backbone")
    assert type(model) is CastModel and processor.num_superpixels == 300
    with pytest.raises(MissingInputError, match="has no image processor"):
        load_model_and_processor(folders / "classifier")


def test_without_a_name_the_bundled_default_model(monkeypatch, tmp_path):
    assert resolve_model_source(None) == str(default_model.default_model_path())
    monkeypatch.setattr(default_model, "DEFAULT_MODEL_DIRECTORY", tmp_path / "nothing")
    with pytest.raises(MissingInputError, match="No default model"):
        resolve_model_source(None)


def test_the_users_mistakes_are_named(folders, tmp_path):
    (tmp_path / "file.txt").write_text("not a model")
    cases = [
        (tmp_path / "missing", MissingInputError, "The model folder .*missing does not exist"),
        (tmp_path, MissingInputError, "holds no model: it has no config.json"),
        (tmp_path / "file.txt", InvalidInputError, "is a file; a model is a folder"),
        ("someone/missing-model", MissingInputError, "the Hub model 'someone/missing-model' could not be found"),
        (folders / "vit", InvalidInputError, r"needs a CAST model .*got ViTConfig"),
    ]
    for name, error, message in cases:
        with pytest.raises(error, match=message) as raised:
            load_cast_model(name)
        assert isinstance(raised.value, UserInputError)
    assert isinstance(MissingInputError("x"), FileNotFoundError) and isinstance(InvalidInputError("x"), ValueError)


def test_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(InvalidInputError, match="'potato' is not a torch device"):
        resolve_device("potato")
    if not torch.cuda.is_available():
        with pytest.raises(InvalidInputError, match="Device 'cuda' is not available on this machine"):
            resolve_device("cuda")
    else:
        assert resolve_device("cuda:0").type == "cuda"
        with pytest.raises(InvalidInputError, match="this machine has"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")
