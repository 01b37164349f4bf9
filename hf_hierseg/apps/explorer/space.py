"""`hf-hierseg export-space DIR`: a folder that runs the hierarchy explorer as a Hugging Face Space.

DIR/app.py            runs `serve` (the same app as `hf-hierseg serve`) on the address Spaces give it
DIR/README.md         the Space header (sdk: gradio, app_file: app.py, ...) and a short description
DIR/requirements.txt  hf_hierseg's dependencies (Spaces install Gradio themselves, at `sdk_version`)
DIR/hf_hierseg/       a copy of this package (with its bundled default model), imported by app.py
DIR/model/            the model, when it is a local folder (a Hub id is loaded from the Hub instead)
"""

import importlib.metadata
import shutil
import sys
from pathlib import Path

from ...errors import InvalidInputError
from ...loading import is_hub_id, resolve_model_source


PACKAGE_NAME = "hf_hierseg"
PACKAGE_DIRECTORY = Path(__file__).resolve().parents[2]  # hf_hierseg/ (explorer -> apps -> hf_hierseg)
MODEL_FOLDER = "model"
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", ".*")

APP_TEMPLATE = '''"""{title}: the hf_hierseg hierarchy explorer as a Hugging Face Space (written by `hf-hierseg export-space`).

Spaces run `python app.py` with GRADIO_SERVER_NAME=0.0.0.0; here it serves http://127.0.0.1:7860/ only.
"""

import os
from pathlib import Path

from hf_hierseg.apps.explorer.command import serve


HERE = Path(__file__).resolve().parent
MODEL = {model!r}  # a folder beside this file, a Hub id, or None: the model bundled with hf_hierseg


def model_source():
    return str(HERE / MODEL) if MODEL is not None and (HERE / MODEL).is_dir() else MODEL


if __name__ == "__main__":
    serve(
        model_source(),
        host=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
    )
'''

README_TEMPLATE = """---
{header}
---

# {title}

An interactive explorer of the part-to-whole hierarchy of CAST ("Learning Hierarchical Image Segmentation For
Recognition and By Recognition", Ke, Mo & Yu, ICLR 2024): upload a photo or pick a bundled one, move the level
slider, and click a region to see the wholes it belongs to and the parts it is made of, with their areas. The label
maps (16-bit PNGs) and the hierarchy (JSON) can be downloaded.

Model: {model_text}. Runs on a CPU; made with `hf-hierseg export-space` of the `hf_hierseg` package (a copy is in
`hf_hierseg/`). Locally: `pip install -r requirements.txt gradio && python app.py`.
"""


def package_requirements():
    """hf_hierseg's own requirements (no extras), as its installed metadata lists them."""
    try:
        requirements = importlib.metadata.requires(PACKAGE_NAME) or []
    except importlib.metadata.PackageNotFoundError:
        raise InvalidInputError(
            f"{PACKAGE_NAME} is not installed (no package metadata): install it (pip install -e .) before "
            "export-space."
        ) from None
    return [requirement for requirement in requirements if "extra ==" not in requirement]


def space_header(title, model_id=None):
    """The YAML lines of a Space's README header."""
    lines = [
        f"title: {title}",
        "emoji: 🌳",
        "colorFrom: yellow",
        "colorTo: green",
        "sdk: gradio",
    ]
    try:
        lines.append(f"sdk_version: {importlib.metadata.version('gradio')}")
    except importlib.metadata.PackageNotFoundError:
        pass  # Spaces then choose the Gradio version
    lines += [
        f'python_version: "{sys.version_info.major}.{sys.version_info.minor}"',
        "app_file: app.py",
        "pinned: false",
        "license: mit",
        "short_description: Click a region to see its parts and wholes (CAST)",
        "tags:\n- image-segmentation\n- hierarchical-segmentation\n- cast",
    ]
    if model_id is not None:
        lines.append(f"models:\n- {model_id}")
    return "\n".join(lines)


def export_space(directory, model=None, title="CAST hierarchy explorer", force=False):
    """Write the Space into `directory` (see the module docstring). Returns the names written (top level).

    Raises:
        InvalidInputError: `directory` is a file, or a folder that is not empty (without `force`).
        MissingInputError: `model` is neither a model folder nor a Hub id.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise InvalidInputError(f"{directory} is a file, not a folder.")
    if directory.is_dir() and any(directory.iterdir()) and not force:
        raise InvalidInputError(f"{directory} is not empty: choose a new folder or pass --force.")
    model_value, model_id, model_text = None, None, "the small demonstration model bundled with hf_hierseg"
    if model is not None:
        source = resolve_model_source(model)  # a folder with config.json, or a Hub id
        if Path(source).is_dir():
            model_value, model_text = MODEL_FOLDER, f"`{Path(source).name}` (in `{MODEL_FOLDER}/`)"
        elif is_hub_id(str(source)):
            model_value = model_id = str(source)
            model_text = f"[{model_id}](https://huggingface.co/{model_id})"
    directory.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(directory / PACKAGE_NAME, ignore_errors=True)
    shutil.copytree(PACKAGE_DIRECTORY, directory / PACKAGE_NAME, ignore=IGNORED)
    written = [PACKAGE_NAME]
    if model_value == MODEL_FOLDER:
        shutil.rmtree(directory / MODEL_FOLDER, ignore_errors=True)
        shutil.copytree(source, directory / MODEL_FOLDER, ignore=IGNORED)
        written.append(MODEL_FOLDER)
    (directory / "app.py").write_text(APP_TEMPLATE.format(title=title, model=model_value), encoding="utf-8")
    header = space_header(title, model_id)
    readme = README_TEMPLATE.format(header=header, title=title, model_text=model_text)
    (directory / "README.md").write_text(readme, encoding="utf-8")
    (directory / "requirements.txt").write_text("\n".join(package_requirements()) + "\n", encoding="utf-8")
    return written + ["app.py", "README.md", "requirements.txt"]


__all__ = ["export_space", "package_requirements", "space_header"]
