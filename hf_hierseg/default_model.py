"""The small CAST model shipped with the package (`hf_hierseg/assets/default_model/`).

    from hf_hierseg import load_default

    model, processor = load_default()  # offline: a `CastModel` (eval mode) and its `CastImageProcessor`

It is a demonstration model, not one of the paper's: a narrow CAST pre-trained for a few CPU minutes with MoCo v3
on data that is available offline (`hf_hierseg.apps.default_model_recipe` trains it; `scripts/train_default_model.py`
re-trains it from the seed and re-exports the folder).
"""

from pathlib import Path

from .image_processing_cast import CastImageProcessor
from .modeling_cast import CastModel


DEFAULT_MODEL_DIRECTORY = Path(__file__).resolve().parent / "assets" / "default_model"
TRAINING_SUMMARY_FILE = "training_summary.json"


def default_model_path():
    """Folder of the bundled default model (`config.json`, `model.safetensors`, `preprocessor_config.json`).

    Raises:
        FileNotFoundError: this installation has no default model (e.g. a source tree without the trained files).
    """
    if not (DEFAULT_MODEL_DIRECTORY / "config.json").is_file():
        raise FileNotFoundError(
            f"No default model in {DEFAULT_MODEL_DIRECTORY}: train it with `python scripts/train_default_model.py`, "
            "or pass a model folder / Hub id explicitly."
        )
    return DEFAULT_MODEL_DIRECTORY


def load_default(device="cpu"):
    """The bundled default model and its image processor, read from the package folder only (no network).

    Returns:
        `(model, processor)`: a `CastModel` in eval mode on `device` and a `CastImageProcessor`.
    """
    path = default_model_path()
    model = CastModel.from_pretrained(path, local_files_only=True)
    processor = CastImageProcessor.from_pretrained(path, local_files_only=True)
    return model.to(device).eval(), processor


__all__ = ["DEFAULT_MODEL_DIRECTORY", "TRAINING_SUMMARY_FILE", "default_model_path", "load_default"]
