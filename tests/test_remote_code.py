"""Remote code the transformers way. `save_pretrained` ships, through `register_for_auto_class`, the core modules the
saved class needs and its `auto_map` entry, and no `custom_pipelines`; sharing (`hub.push_folder_to_hub`,
`hub.add_remote_code`) ships every core module, the `auto_map` of every CAST Auto class and `custom_pipelines`. A
Python that cannot import `hf_hierseg` loads them (plain folder, shared folder, local Hub, Hub cache offline) with
the package's outputs."""

import ast
import configparser
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import pipeline

import hf_hierseg
from hf_hierseg import (
    CastBackbone,
    CastForImageClassification,
    CastForSemanticSegmentation,
    CastImageProcessor,
    CastModel,
)
from hf_hierseg.hub import add_remote_code, push_folder_to_hub, shared_files
from hf_hierseg.pipelines import CastImageSegmentationPipeline, HierarchicalSegmentationPipeline

from cast_testing import CastModelTester, random_superpixels


pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIR = Path(hf_hierseg.__file__).resolve().parent
# Modules the shipped files may import besides each other.
ALLOWED_IMPORTS = {"torch", "numpy", "cv2", "PIL", "transformers"}


def core_module_files():
    """`<module>.py` of every core module, as the import-linter contract for the core (setup.cfg) lists them."""
    parser = configparser.ConfigParser()
    parser.read(REPO_ROOT / "setup.cfg")
    modules = parser["importlinter:contract:core-dependencies"]["source_modules"].split()
    return {module.rsplit(".", 1)[-1] + ".py" for module in modules}


CORE_FILES = core_module_files()


TESTER = CastModelTester()


def model_inputs():
    generator = torch.Generator().manual_seed(1)
    return {"pixel_values": torch.randn(2, 3, 64, 64, generator=generator), "superpixels": random_superpixels(2)}


def read_json(path):
    return json.loads(Path(path).read_text())


def shipped_files(folder):
    return {path.name for path in Path(folder).glob("*.py")}


def check_flat_core_files(folder):
    """The shipped files are the package's core modules, unchanged, and flat: relative imports resolve inside the
    folder, other imports are allowed libraries."""
    shipped = shipped_files(folder)
    assert shipped <= CORE_FILES, shipped - CORE_FILES
    for name in shipped:
        path = Path(folder) / name
        assert path.read_bytes() == (PACKAGE_DIR / name).read_bytes(), name
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1 and f"{node.module}.py" in shipped, (name, node.module)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module]
                for imported in names:
                    top = imported.split(".")[0]
                    assert top in ALLOWED_IMPORTS or top in sys.stdlib_module_names, (name, imported)


def check_auto_map_entry(folder, auto_map, auto_class, cast_class):
    module, name = auto_map[auto_class].split(".")
    assert name == cast_class.__name__ and f"{module}.py" in shipped_files(folder)
    assert f"class {name}(" in (Path(folder) / f"{module}.py").read_text()


@pytest.fixture(scope="module")
def classifier():
    return TESTER.create_model(CastForImageClassification, id2label={0: "red", 1: "green", 2: "blue"})


@pytest.mark.parametrize(
    "model_class, auto_class",
    [
        (CastModel, "AutoModel"),
        (CastForImageClassification, "AutoModelForImageClassification"),
        (CastForSemanticSegmentation, "AutoModelForSemanticSegmentation"),
        (CastBackbone, "AutoBackbone"),
    ],
)
def test_save_pretrained_ships_the_core_modules_of_the_saved_class(tmp_path, model_class, auto_class):
    TESTER.save_model_folder(tmp_path, model_class)
    config = read_json(tmp_path / "config.json")
    assert set(config["auto_map"]) == {"AutoConfig", auto_class}
    check_auto_map_entry(tmp_path, config["auto_map"], auto_class, model_class)
    assert config["auto_map"]["AutoConfig"].startswith("configuration_cast.")
    assert "custom_pipelines" not in config  # it would make pipeline(task, model=folder) demand trust_remote_code
    processor_map = read_json(tmp_path / "preprocessor_config.json")["auto_map"]
    assert processor_map == {"AutoImageProcessor": "image_processing_cast.CastImageProcessor"}
    assert {"configuration_cast.py", "modeling_cast.py", "image_processing_cast.py"} <= shipped_files(tmp_path)
    assert "pipelines.py" not in shipped_files(tmp_path)  # pipelines ship only with what is shared
    check_flat_core_files(tmp_path)


def test_shared_folder_ships_every_core_module_and_custom_pipelines(tmp_path, classifier):
    classifier.save_pretrained(tmp_path)
    TESTER.get_image_processor().save_pretrained(tmp_path)
    add_remote_code(tmp_path)
    assert shipped_files(tmp_path) == CORE_FILES  # exactly the core: no tool module
    check_flat_core_files(tmp_path)
    config = read_json(tmp_path / "config.json")
    for auto_class, cast_class in hf_hierseg.AUTO_CLASSES.items():
        if auto_class != "AutoImageProcessor":
            check_auto_map_entry(tmp_path, config["auto_map"], auto_class, cast_class)
    processor_map = read_json(tmp_path / "preprocessor_config.json")["auto_map"]
    check_auto_map_entry(tmp_path, processor_map, "AutoImageProcessor", CastImageProcessor)
    pipelines = config["custom_pipelines"]
    assert set(pipelines) == {"hierarchical-segmentation", "zero-shot-hierarchical-segmentation", "image-segmentation"}
    assert pipelines["hierarchical-segmentation"]["impl"] == "pipelines.HierarchicalSegmentationPipeline"
    zero_shot = pipelines["zero-shot-hierarchical-segmentation"]
    assert zero_shot["impl"] == "pipelines.ZeroShotHierarchicalSegmentationPipeline"
    assert zero_shot["pt"] == ["AutoModel"]
    assert pipelines["image-segmentation"]["impl"] == "pipelines.CastImageSegmentationPipeline"
    assert pipelines["image-segmentation"]["pt"] == ["AutoModel"]  # no head: the segments of a hierarchy level


def test_segmentation_checkpoint_feeds_image_segmentation_through_its_head(tmp_path):
    TESTER.create_model(CastForSemanticSegmentation, num_labels=4).save_pretrained(tmp_path)
    config = json.loads(shared_files(tmp_path)["config.json"])
    assert config["custom_pipelines"]["image-segmentation"]["pt"] == ["AutoModelForSemanticSegmentation"]
    assert config["custom_pipelines"]["hierarchical-segmentation"]["pt"] == ["AutoModel"]
    assert "custom_pipelines" not in read_json(tmp_path / "config.json")  # shared_files changes nothing


# Runs in `python -I` with `hf_hierseg` blocked: loads every source with trust_remote_code and writes the outputs.
CHILD = r"""
import importlib.abc, json, sys

class BlockPackage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "hf_hierseg" or name.startswith("hf_hierseg."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)

sys.meta_path.insert(0, BlockPackage())
try:
    import hf_hierseg  # noqa: F401
    raise SystemExit("hf_hierseg is importable in the child")
except ModuleNotFoundError:
    pass

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
import transformers
from transformers import AutoConfig, AutoImageProcessor, pipeline

spec = json.loads(sys.argv[1])
torch.set_num_threads(spec["threads"])  # the parent's: bitwise equal outputs need the same reduction order
inputs = load_file(spec["inputs"])
tensors, report = {}, {}
for name, source in spec["sources"].items():
    path = source["path"]
    config = AutoConfig.from_pretrained(path, trust_remote_code=True)
    processor = AutoImageProcessor.from_pretrained(path, trust_remote_code=True)
    report[name] = {"config": type(config).__module__, "processor": type(processor).__module__}
    processed = processor(images=Image.open(spec["image"]), return_tensors="pt")
    tensors[f"{name}/pixel_values"], tensors[f"{name}/superpixels"] = processed["pixel_values"], processed["superpixels"]
    for auto_class in source["models"]:
        kwargs = {"out_features": ["level2"]} if auto_class == "AutoBackbone" else {}
        model = getattr(transformers, auto_class).from_pretrained(path, trust_remote_code=True, **kwargs).eval()
        report[name][auto_class] = type(model).__module__
        with torch.no_grad():
            outputs = model(**inputs)
        if auto_class == "AutoModelForImageClassification":
            tensors[f"{name}/logits"] = outputs.logits
            tensors[f"{name}/hierarchy"] = torch.stack(outputs.hierarchy, 1)
        elif auto_class == "AutoModel":
            tensors[f"{name}/last_hidden_state"] = outputs.last_hidden_state
        elif auto_class == "AutoBackbone":
            tensors[f"{name}/level2"] = outputs.feature_maps[0]
    report[name]["loaded_modules"] = sorted(m for m in sys.modules if m.startswith("transformers_modules"))
    for task in source["pipelines"]:
        runner = pipeline(task, model=path, trust_remote_code=True)
        report[name][f"{task}/class"] = type(runner).__module__ + "." + type(runner).__name__
        if task == "image-classification":
            report[name][task] = runner(spec["image"], top_k=3)
        elif task == "image-feature-extraction":
            tensors[f"{name}/{task}"] = runner(spec["image"], pool=True, return_tensors=True)
        elif task == "image-segmentation":
            report[name][task] = sorted(result["label"] for result in runner(spec["image"], level=2))
        else:
            levels = runner(spec["image"])["levels"]
            report[name][task] = [{s["id"]: s["parent"] for s in level["segments"]} for level in levels]
            for level in levels:
                tensors[f"{name}/{task}/{level['level']}"] = torch.from_numpy(level["segmentation"])
save_file({key: value.contiguous() for key, value in tensors.items()}, spec["output"])
print(json.dumps(report))
"""


def run_without_package(spec, offline=False):
    environment = dict(os.environ)
    environment.pop("PYTHONPATH", None)
    if offline:
        environment["HF_HUB_OFFLINE"] = "1"
    result = subprocess.run(
        [sys.executable, "-I", "-c", CHILD, json.dumps(spec)],
        capture_output=True,
        text=True,
        env=environment,
        stdin=subprocess.DEVNULL,  # a prompt would fail instead of waiting
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


FOLDER_MODELS = ["AutoModelForImageClassification", "AutoModel"]
# transformers 5.24's AutoBackbone.from_pretrained asks the Hub whether the name is a repo: online Hub ids only.
HUB_MODELS = [*FOLDER_MODELS, "AutoBackbone"]
ALL_TASKS = ["image-classification", "image-feature-extraction", "image-segmentation", "hierarchical-segmentation"]


@pytest.mark.slow
def test_remote_code_without_the_package_matches_the_package(tmp_path, classifier, hub_server):
    inputs = model_inputs()
    save_file(inputs, tmp_path / "inputs.safetensors")
    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(
        (80, 60), Image.BICUBIC
    ).save(image)
    processor = TESTER.get_image_processor()
    plain, shared = tmp_path / "plain", tmp_path / "shared"
    for folder in (plain, shared):
        classifier.save_pretrained(folder)
        processor.save_pretrained(folder)
    add_remote_code(shared)  # shared by copying the folder
    repo_id = "test-user/tiny-remote"
    plain_config = (plain / "config.json").read_bytes()
    push_folder_to_hub(plain, repo_id, "Upload tiny CAST")  # shared through the Hub
    assert (plain / "config.json").read_bytes() == plain_config  # the local folder stays plain
    assert shipped_files(plain) < CORE_FILES
    assert {name for name in hub_server.files(repo_id) if name.endswith(".py")} == CORE_FILES
    assert "custom_pipelines" in json.loads(hub_server.files(repo_id)["config.json"])

    with torch.no_grad():
        expected = classifier(**inputs)
        base = CastModel.from_pretrained(plain).eval()
        expected_tokens = base(**inputs).last_hidden_state
        expected_level2 = CastBackbone.from_pretrained(plain, out_features=["level2"]).eval()(**inputs).feature_maps[0]
        expected_processed = processor(images=Image.open(image), return_tensors="pt")
        expected_classes = pipeline("image-classification", model=classifier, image_processor=processor)(
            str(image), top_k=3
        )
        expected_pooled = pipeline("image-feature-extraction", model=base, image_processor=processor)(
            str(image), pool=True, return_tensors=True
        )
        expected_segments = sorted(
            r["label"]
            for r in CastImageSegmentationPipeline(model=classifier, image_processor=processor)(str(image), level=2)
        )
        expected_levels = HierarchicalSegmentationPipeline(model=classifier, image_processor=processor)(str(image))

    spec = {
        "sources": {
            # A plain save_pretrained folder: its own class, the processor and transformers' own pipelines.
            "plain": {
                "path": str(plain),
                "models": ["AutoModelForImageClassification"],
                "pipelines": ["image-classification"],
            },
            "local": {"path": str(shared), "models": FOLDER_MODELS, "pipelines": ALL_TASKS},
            "hub": {"path": repo_id, "models": HUB_MODELS, "pipelines": ["hierarchical-segmentation"]},
        },
        "inputs": str(tmp_path / "inputs.safetensors"),
        "output": str(tmp_path / "online.safetensors"),
        "image": str(image),
        "threads": torch.get_num_threads(),
    }
    report = run_without_package(spec)
    hub_server.stop()  # the offline load must come from the cache alone
    offline_spec = {
        **spec,
        "sources": {"offline": {**spec["sources"]["hub"], "models": FOLDER_MODELS}},
        "output": str(tmp_path / "offline.safetensors"),
    }
    report.update(run_without_package(offline_spec, offline=True))

    outputs = {**load_file(tmp_path / "online.safetensors"), **load_file(tmp_path / "offline.safetensors")}
    sources = {**spec["sources"], **offline_spec["sources"]}
    for name, source in sources.items():
        models = source["models"]
        for key in ("config", "processor", *models):
            assert report[name][key].startswith("transformers_modules."), (name, key)
        assert torch.equal(outputs[f"{name}/pixel_values"], expected_processed["pixel_values"])
        assert torch.equal(outputs[f"{name}/superpixels"], expected_processed["superpixels"])
        assert torch.equal(outputs[f"{name}/logits"], expected.logits)
        assert torch.equal(outputs[f"{name}/hierarchy"], torch.stack(expected.hierarchy, 1))
        if "AutoModel" in models:
            assert torch.equal(outputs[f"{name}/last_hidden_state"], expected_tokens)
        if "AutoBackbone" in models:
            assert torch.equal(outputs[f"{name}/level2"], expected_level2)

    # Pipelines: transformers' own with the remote model, the shared repo's own classes, the package's results.
    for name in ("plain", "local"):
        assert [r["label"] for r in report[name]["image-classification"]] == [r["label"] for r in expected_classes]
        assert [r["score"] for r in report[name]["image-classification"]] == pytest.approx(
            [r["score"] for r in expected_classes], abs=1e-6
        )
    for name in ("local", "hub", "offline"):
        pipeline_class = report[name]["hierarchical-segmentation/class"]
        assert pipeline_class.startswith("transformers_modules.")
        assert pipeline_class.endswith(".pipelines.HierarchicalSegmentationPipeline")
    assert report["local"]["image-segmentation/class"].startswith("transformers_modules.")
    assert report["local"]["image-segmentation/class"].endswith(".pipelines.CastImageSegmentationPipeline")
    assert torch.equal(outputs["local/image-feature-extraction"], expected_pooled)
    assert report["local"]["image-segmentation"] == expected_segments
    for name in ("local", "hub", "offline"):
        parents = [{int(k): v for k, v in level.items()} for level in report[name]["hierarchical-segmentation"]]
        for level, expected_level in enumerate(expected_levels["levels"]):
            assert parents[level] == {s["id"]: s["parent"] for s in expected_level["segments"]}
            assert np.array_equal(
                outputs[f"{name}/hierarchical-segmentation/{level + 1}"].numpy(), expected_level["segmentation"]
            )
