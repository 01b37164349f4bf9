"""The hierarchy explorer without a server: what it computes for an image (regions, their wholes and parts with
areas, the pictures with a selection highlighted, the downloads), for the default model on a real photo and for
tiny classifier / segmentation models; bad files; the cost guard; the Space export; the commands' arguments."""

import io
import json
import subprocess
import sys
import time

import numpy as np
import PIL.Image
import pytest
import torch

from hf_hierseg import CastForImageClassification, CastForSemanticSegmentation
from hf_hierseg.apps.explorer.analysis import (
    DIMMED,
    HIGHLIGHT_COLOR,
    OUTLINE_WIDTH,
    VIEWS,
    ExplorerModel,
    Selection,
    display_size,
    open_image,
)
from hf_hierseg.apps.explorer.space import export_space
from hf_hierseg.cli import main
from hf_hierseg.errors import InvalidInputError
from hf_hierseg.visualization import overlay_labels

from cast_testing import CastModelTester


@pytest.fixture(scope="module")
def explorer():
    return ExplorerModel.load()  # the bundled default model


@pytest.fixture(scope="module")
def voc(explorer, voc_photo, tmp_path_factory):
    """The analysis of the VOC photo (500x375: shown at its own size) and its downloads read back."""
    analysis = explorer.analyse(voc_photo, "voc")
    paths = analysis.write_downloads(tmp_path_factory.mktemp("downloads"))
    labels = {level: np.asarray(PIL.Image.open(paths[level])).astype(np.int64) for level in range(5)}
    record = json.loads(paths[-1].read_text())
    return analysis, labels, record, [path.name for path in paths]


def segments_of(record, level):
    return {segment["id"]: segment for segment in record["levels"][level]["segments"]}


def test_downloads_are_the_label_maps_at_the_image_size_and_the_json(voc, explorer):
    analysis, labels, record, names = voc
    crop = explorer.processor.crop_size
    assert names == [f"voc_level{level}_labels.png" for level in range(5)] + ["voc.json"]
    assert analysis.size == (375, 500) and analysis.image.shape == (375, 500, 3)
    assert record["image"] == "voc" and record["model"] == "hf_hierseg default model"
    assert record["resolution"] == "model input" and record["model_input_size"] == [crop["height"], crop["width"]]
    for level in range(5):
        assert labels[level].shape == (375, 500)
        np.testing.assert_array_equal(labels[level], analysis.maps[level])  # the display size is the image's
        ids, counts = np.unique(labels[level], return_counts=True)
        segments = segments_of(record, level)
        assert sorted(segments) == ids.tolist()
        assert [segments[i]["area"] for i in ids] == counts.tolist()  # areas count the pixels of the label map
    assert [len(record["levels"][level]["segments"]) for level in range(1, 5)] == [48, 24, 12, 6]


def test_a_region_shows_its_wholes_and_parts_with_their_areas(voc):
    analysis, labels, record, _ = voc
    for level in range(1, 5):
        for region in np.unique(labels[level]).tolist():
            y, x = np.argwhere(labels[level] == region)[0]
            selection = analysis.select_at(level, x, y)
            assert selection == Selection(level, region)
            hierarchy = analysis.hierarchy(selection)
            selected = hierarchy["selected"]
            assert selected["area"] == (labels[level] == region).sum()
            assert selected["share"] == pytest.approx(selected["area"] / (375 * 500))
            # Wholes: the parent links of the JSON, up to level 4, each containing the region's pixels.
            parent = segments_of(record, level)[region]["parent"]
            for whole in hierarchy["wholes"]:
                assert whole["region"] == parent
                assert whole["area"] == segments_of(record, whole["level"])[parent]["area"]
                assert np.all(labels[whole["level"]][labels[level] == region] == parent)
                parent = segments_of(record, whole["level"])[parent]["parent"]
            assert [whole["level"] for whole in hierarchy["wholes"]] == list(range(level + 1, 5)) and parent is None
            # Parts: at every finer level, exactly the segments inside the region; their areas add up to it.
            for finer in range(1, level):
                parts = [part for part in hierarchy["parts"] if part["level"] == finer]
                assert [part["region"] for part in parts] == np.unique(labels[finer][labels[level] == region]).tolist()
                assert sum(part["area"] for part in parts) == selected["area"]
            assert hierarchy["superpixels"] == len(np.unique(labels[0][labels[level] == region]))


@pytest.mark.parametrize("view", VIEWS)
def test_the_selection_is_highlighted_at_every_level(voc, view):
    analysis, labels, _, _ = voc
    selection = analysis.select_at(2, 250, 200)
    wholes = {row["level"]: row["region"] for row in analysis.hierarchy(selection)["wholes"]}
    for level in range(1, 5):
        plain = analysis.view(level, view)
        picture = analysis.picture(level, view, selection)
        region = wholes.get(level, selection.region)
        mask = labels[max(level, 2)] == region  # the whole above, the region itself at its level and below
        inner = inner_pixels(mask, OUTLINE_WIDTH)
        np.testing.assert_array_equal(picture[inner], plain[inner])
        np.testing.assert_array_equal(picture[~mask], np.rint(plain[~mask] * DIMMED).astype(np.uint8))
        assert np.all(picture[mask & ~inner] == HIGHLIGHT_COLOR) and (mask & ~inner).any()
    pictures = analysis.level_pictures(selection, view)
    assert [caption.split(":")[0] for _, caption in pictures] == ["level 1", "level 2", "level 3", "level 4"]
    assert pictures[1][1].startswith(f"level 2: selected region {selection.region} (")
    assert pictures[3][1].startswith(f"level 4: whole region {wholes[4]} (")


def inner_pixels(mask, width):
    """The pixels of `mask` whose (2 width + 1)^2 neighbourhood lies in `mask`, the image extended by its edge pixels
    (so the image border is no region edge)."""
    height, columns = mask.shape
    padded = np.pad(mask, width, mode="edge")
    inner = mask.copy()
    for dy in range(2 * width + 1):
        for dx in range(2 * width + 1):
            inner &= padded[dy : dy + height, dx : dx + columns]
    return inner


def test_views_are_the_visualization_pictures(voc):
    analysis, labels, _, _ = voc
    np.testing.assert_array_equal(analysis.view(3, "overlay"), overlay_labels(analysis.image, labels[3]))
    np.testing.assert_array_equal(analysis.picture(3, "overlay"), analysis.view(3, "overlay"))
    with pytest.raises(InvalidInputError, match="view must be one of"):
        analysis.view(3, "sepia")
    with pytest.raises(InvalidInputError, match=r"level must be an integer in 1\.\.4"):
        analysis.select_at(5, 0, 0)
    with pytest.raises(InvalidInputError, match=r"\(500, 0\) is outside the 500x375 picture"):
        analysis.select_at(1, 500, 0)
    with pytest.raises(InvalidInputError, match="x and y must be pixel coordinates"):
        analysis.select_at(1, None, 0)


def test_large_images_are_shown_downscaled_and_measured_at_their_size(explorer, voc_photo):
    photo = voc_photo.resize((1600, 1200))
    analysis = explorer.analyse(photo, "large")
    assert display_size(1200, 1600) == (480, 640)
    assert analysis.image.shape == (480, 640, 3) and analysis.maps.shape == (5, 480, 640)
    for level in range(5):  # every level partitions the whole image, in pixels of the image
        assert sum(segment["area"] for segment in analysis.record["levels"][level]["segments"]) == 1600 * 1200
    hierarchy = analysis.hierarchy(analysis.select_at(3, 320, 240))
    for level in (1, 2):
        parts = [part["area"] for part in hierarchy["parts"] if part["level"] == level]
        assert sum(parts) == hierarchy["selected"]["area"]


@pytest.mark.parametrize(
    "mode, size", [("L", (90, 60)), ("RGBA", (64, 96)), ("P", (70, 70)), ("I;16", (80, 50)), ("CMYK", (50, 80))]
)
def test_images_of_any_mode_and_size(explorer, voc_photo, mode, size):
    image = voc_photo.resize(size).convert(mode) if mode != "I;16" else voc_photo.resize(size).convert("I;16")
    analysis = explorer.analyse(image, mode)
    assert analysis.size == (size[1], size[0]) and analysis.image.shape == (size[1], size[0], 3)
    assert analysis.hierarchy(analysis.select_at(4, 0, 0))["selected"]["area"] > 0


def test_exif_rotation_is_applied(explorer, voc_photo, tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    voc_photo.resize((120, 80)).save(path, exif=exif)
    analysis = explorer.analyse(open_image(path), "rotated.jpg")
    assert analysis.size == (120, 80)


def test_full_resolution_and_the_cost_guard(explorer, voc_photo):
    analysis = explorer.analyse(voc_photo, "voc", "full resolution")
    assert tuple(analysis.model_maps.shape) == (5, 368, 496)  # sides rounded down to multiples of 8
    assert analysis.size == (375, 500) and analysis.record["resolution"] == "full resolution"
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"about 93,750 superpixels, more than max_superpixels=16,384"):
        explorer.analyse(PIL.Image.new("RGB", (6000, 4000), (90, 120, 30)), "huge", "full resolution")
    assert time.perf_counter() - start < 10  # refused before superpixels or the model run
    assert explorer.analyse(PIL.Image.new("RGB", (6000, 4000), (90, 120, 30)), "huge").size == (4000, 6000)
    with pytest.raises(InvalidInputError, match="resolution must be one of"):
        explorer.analyse(voc_photo, "voc", "native")


def test_bad_files_are_named_with_the_problem(tmp_path, voc_photo):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not an image\n")
    buffer = io.BytesIO()
    voc_photo.save(buffer, format="PNG")
    (tmp_path / "cut.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(InvalidInputError, match=r"empty\.png is empty \(0 bytes\)"):
        open_image(tmp_path / "empty.png")
    with pytest.raises(InvalidInputError, match=r"notes\.txt is not an image this app can read"):
        open_image(tmp_path / "notes.txt")
    with pytest.raises(InvalidInputError, match=r"cut\.png is not an image this app can read \(OSError"):
        open_image(tmp_path / "cut.png")
    with pytest.raises(InvalidInputError, match="no such file"):
        open_image(tmp_path / "missing.png")


# The tiny CAST these tests were written with: 16 segments pooled to 8 -> 4 -> 3 -> 2 clusters.
TESTER = CastModelTester(num_clusters=(8, 4, 3, 2), num_labels=5)


def tiny_folder(folder, model):
    model.save_pretrained(folder)
    TESTER.get_image_processor().save_pretrained(folder)
    return folder


def test_a_classifier_shows_its_top_labels(tmp_path, voc_photo):
    torch.manual_seed(0)
    labels = dict(enumerate(["cat", "dog", "car", "tree", "boat", "sky", "person"]))
    config = TESTER.get_config(num_labels=7, id2label=labels, label2id={v: k for k, v in labels.items()})
    explorer = ExplorerModel.load(tiny_folder(tmp_path / "classifier", CastForImageClassification(config)))
    assert explorer.kind == "classifier"
    analysis = explorer.analyse(voc_photo, "voc")
    inputs = explorer.processor(voc_photo, return_tensors="pt", do_center_crop=False, size={"height": 64, "width": 64})
    with torch.no_grad():
        probabilities = explorer.model(**inputs).logits[0].softmax(-1)
    expected = {labels[i]: p for i, p in enumerate(probabilities.tolist())}
    assert list(analysis.top_labels) == sorted(expected, key=expected.get, reverse=True)[:5]
    for name, probability in analysis.top_labels.items():
        assert probability == pytest.approx(expected[name], abs=1e-6)
    assert analysis.record["top_labels"] == analysis.top_labels and analysis.class_map is None


def test_a_segmentation_model_shows_its_class_map(tmp_path, voc_photo):
    torch.manual_seed(0)
    labels = {0: "background", 1: "person", 2: "table"}
    config = TESTER.get_config(num_labels=3, id2label=labels, label2id={v: k for k, v in labels.items()})
    explorer = ExplorerModel.load(tiny_folder(tmp_path / "segmentation", CastForSemanticSegmentation(config)))
    assert explorer.kind == "segmentation"
    analysis = explorer.analyse(voc_photo, "voc")
    inputs = explorer.processor(voc_photo, return_tensors="pt", do_center_crop=False, size={"height": 64, "width": 64})
    with torch.no_grad():
        outputs = explorer.model(**inputs)
    classes = explorer.processor.post_process_semantic_segmentation(outputs, superpixels=inputs["superpixels"])[0]
    np.testing.assert_array_equal(analysis.model_class_map.numpy(), classes.numpy())
    assert analysis.class_map.shape == (375, 500) and set(np.unique(analysis.class_map)) <= {0, 1, 2}
    shares = analysis.record["classes"]
    assert sum(row["share"] for row in shares) == pytest.approx(1.0)
    assert {row["class"] for row in shares} == {labels[i] for i in np.unique(classes.numpy())}
    np.testing.assert_array_equal(analysis.class_picture(), overlay_labels(analysis.image, analysis.class_map))
    names = [path.name for path in analysis.write_downloads(tmp_path / "downloads")]
    assert "voc_classes.png" in names and analysis.top_labels is None


def test_export_space_writes_a_runnable_space(tmp_path):
    import yaml

    files = export_space(tmp_path / "space")
    assert files == ["hf_hierseg", "app.py", "README.md", "requirements.txt"]
    readme = (tmp_path / "space" / "README.md").read_text()
    header = yaml.safe_load(readme.split("---")[1])
    assert header["sdk"] == "gradio" and header["app_file"] == "app.py" and "sdk_version" in header
    assert "models" not in header  # the bundled model travels inside the copied package
    requirements = (tmp_path / "space" / "requirements.txt").read_text().splitlines()
    assert any(line.startswith("transformers") for line in requirements) and not any(
        "pytest" in r for r in requirements
    )
    package = tmp_path / "space" / "hf_hierseg"
    assert (package / "apps" / "explorer" / "app.py").is_file()
    assert (package / "assets" / "default_model" / "model.safetensors").is_file()
    assert not list(package.rglob("__pycache__"))
    app = (tmp_path / "space" / "app.py").read_text()
    compile(app, "app.py", "exec")
    assert "MODEL = None" in app and "GRADIO_SERVER_NAME" in app
    with pytest.raises(InvalidInputError, match="is not empty"):
        export_space(tmp_path / "space")


def test_export_space_with_a_model_folder_or_a_hub_id(tmp_path):
    torch.manual_seed(0)
    folder = tiny_folder(tmp_path / "tiny", CastForImageClassification(TESTER.get_config()))
    export_space(tmp_path / "space", model=folder)
    assert (tmp_path / "space" / "model" / "config.json").is_file()
    assert "MODEL = 'model'" in (tmp_path / "space" / "app.py").read_text()
    export_space(tmp_path / "hub_space", model="someone/cast-small")
    assert "models:\n- someone/cast-small" in (tmp_path / "hub_space" / "README.md").read_text()
    assert "MODEL = 'someone/cast-small'" in (tmp_path / "hub_space" / "app.py").read_text()


def test_commands_arguments_and_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--host" in text and "127.0.0.1, this machine only" in text and "--port" in text
    assert main(["serve", "--port", "70000"]) == 1
    assert "--port must be in 1..65535" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "file.txt").write_text("x")
    assert main(["export-space", str(tmp_path / "full")]) == 1
    assert "is not empty" in capsys.readouterr().err
    assert main(["export-space", str(tmp_path / "space")]) == 0
    assert (tmp_path / "space" / "app.py").is_file()


@pytest.mark.slow
def test_the_package_and_the_commands_import_without_gradio():
    code = (
        "import sys\n"
        "import hf_hierseg, hf_hierseg.cli, hf_hierseg.apps.explorer.command, hf_hierseg.apps.explorer.analysis\n"
        "from hf_hierseg.apps.explorer.command import serve_parser\n"
        "serve_parser()\n"
        "assert 'gradio' not in sys.modules, 'gradio imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
