"""Remote code: `save_pretrained` / `push_to_hub` ship flat module files with `auto_map` and `custom_pipelines`, and
a Python that cannot import `hf_hierseg` loads them (local folder, local Hub, Hub cache offline) with identical
outputs."""

import ast
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import pipeline

from hf_hierseg import CastConfig, CastForImageClassification, CastModel
from hf_hierseg.image_processing_cast import CastImageProcessor
from hf_hierseg.remote_code import AUTO_CLASSES, remote_code_files


# Until hf_hierseg/__init__.py does it: the processor's save writes its auto_map to preprocessor_config.json.
CastImageProcessor.register_for_auto_class("AutoImageProcessor")


# Modules the shipped files may import besides each other.
ALLOWED_IMPORTS = {"torch", "numpy", "cv2", "PIL", "transformers"}


def tiny_config(**kwargs):
    return CastConfig(
        hidden_size=24, num_attention_heads=4, depths=(1, 1, 1, 1), num_clusters=(16, 8, 4, 2), image_size=64, **kwargs
    )


def random_superpixels(batch, size=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 30, (batch, size // 4, size // 4), generator=generator)
    labels = blocks.repeat_interleave(4, 1).repeat_interleave(4, 2)
    return torch.stack([torch.unique(image, return_inverse=True)[1] for image in labels])


def model_inputs():
    generator = torch.Generator().manual_seed(1)
    return {"pixel_values": torch.randn(2, 3, 64, 64, generator=generator), "superpixels": random_superpixels(2)}


def saved_config(folder):
    config = json.loads((folder / "config.json").read_text())
    assert "auto_map" in config, "no auto_map: CastConfig.save_pretrained must call remote_code.add_remote_code"
    return config


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(0)
    return CastForImageClassification(tiny_config(num_labels=3, id2label={0: "red", 1: "green", 2: "blue"})).eval()


def test_save_pretrained_ships_every_module_and_auto_map(tmp_path, classifier):
    classifier.save_pretrained(tmp_path)
    config = saved_config(tmp_path)
    shipped = {path.name for path in tmp_path.glob("*.py")}
    # Every Auto class whose class exists is mapped, and its module file is in the folder.
    for auto_class in (
        "AutoConfig",
        "AutoModel",
        "AutoModelForImageClassification",
        "AutoBackbone",
        "AutoModelForSemanticSegmentation",
    ):
        module, name = config["auto_map"][auto_class].split(".")
        assert config["auto_map"][auto_class] == AUTO_CLASSES[auto_class]
        assert f"{module}.py" in shipped
        assert f"class {name}(" in (tmp_path / f"{module}.py").read_text()
    pipelines = config["custom_pipelines"]
    assert pipelines["hierarchical-segmentation"]["impl"] == "pipelines.HierarchicalSegmentationPipeline"
    assert pipelines["image-segmentation"]["pt"] == ["AutoModel"]
    assert shipped == {path.name for path in remote_code_files()}

    # The files are flat: relative imports resolve inside the folder, other imports are allowed libraries.
    for path in tmp_path.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1 and f"{node.module}.py" in shipped, (path.name, node.module)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module]
                for name in names:
                    top = name.split(".")[0]
                    assert top in ALLOWED_IMPORTS or top in sys.stdlib_module_names, (path.name, name)


def test_segmentation_checkpoint_feeds_image_segmentation_through_its_head(tmp_path):
    from hf_hierseg.modeling_cast import CastForSemanticSegmentation

    CastForSemanticSegmentation(tiny_config(num_labels=4)).save_pretrained(tmp_path)
    config = saved_config(tmp_path)
    assert config["custom_pipelines"]["image-segmentation"]["pt"] == ["AutoModelForSemanticSegmentation"]


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
from safetensors.torch import load_file, save_file
from transformers import AutoBackbone, AutoConfig, AutoModel, AutoModelForImageClassification, pipeline

spec = json.loads(sys.argv[1])
inputs = load_file(spec["inputs"])
tensors, report = {}, {}
for name, source in spec["sources"].items():
    config = AutoConfig.from_pretrained(source, trust_remote_code=True)
    classifier = AutoModelForImageClassification.from_pretrained(source, trust_remote_code=True).eval()
    model = AutoModel.from_pretrained(source, trust_remote_code=True).eval()
    report[name] = {
        "config": type(config).__module__, "classifier": type(classifier).__module__, "model": type(model).__module__,
        "loaded_modules": sorted(m for m in sys.modules if m.startswith("transformers_modules")),
    }
    with torch.no_grad():
        outputs = classifier(**inputs)
        tensors[f"{name}/logits"] = outputs.logits
        tensors[f"{name}/hierarchy"] = torch.stack(outputs.hierarchy, 1)
        tensors[f"{name}/last_hidden_state"] = model(**inputs).last_hidden_state
        if name == "hub":
            backbone = AutoBackbone.from_pretrained(source, trust_remote_code=True, out_features=["level2"]).eval()
            report[name]["backbone"] = type(backbone).__module__
            tensors[f"{name}/level2"] = backbone(**inputs).feature_maps[0]
    for task in spec["pipelines"].get(name, ()):
        runner = pipeline(task, model=source, trust_remote_code=True)
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
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_remote_code_without_the_package_matches_the_package(tmp_path, classifier, hub_server):
    from hf_hierseg.pipelines import CastImageSegmentationPipeline, HierarchicalSegmentationPipeline

    inputs = model_inputs()
    save_file(inputs, tmp_path / "inputs.safetensors")
    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(
        (80, 60), Image.BICUBIC
    ).save(image)
    processor = CastImageProcessor(size={"height": 64, "width": 64}, crop_size={"height": 64, "width": 64})
    local = tmp_path / "local"
    classifier.save_pretrained(local)
    processor.save_pretrained(local)
    repo_id = "cast-test/tiny-remote"
    classifier.push_to_hub(repo_id)
    processor.push_to_hub(repo_id)

    with torch.no_grad():
        expected = classifier(**inputs)
        base = CastModel.from_pretrained(local).eval()
        expected_tokens = base(**inputs).last_hidden_state
        from hf_hierseg.modeling_cast import CastBackbone

        expected_level2 = CastBackbone.from_pretrained(local, out_features=["level2"]).eval()(**inputs).feature_maps[0]

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

    tasks = ["image-classification", "image-feature-extraction", "image-segmentation", "hierarchical-segmentation"]
    spec = {
        "sources": {"local": str(local), "hub": repo_id},
        "inputs": str(tmp_path / "inputs.safetensors"),
        "output": str(tmp_path / "online.safetensors"),
        "image": str(image),
        "pipelines": {"local": tasks, "hub": ["hierarchical-segmentation"]},
    }
    report = run_without_package(spec)
    hub_server.stop()  # the offline load must come from the cache alone
    offline_spec = {
        **spec,
        "sources": {"offline": repo_id},
        "output": str(tmp_path / "offline.safetensors"),
        "pipelines": {"offline": ["hierarchical-segmentation"]},
    }
    report.update(run_without_package(offline_spec, offline=True))

    outputs = {**load_file(tmp_path / "online.safetensors"), **load_file(tmp_path / "offline.safetensors")}
    for name in ("local", "hub", "offline"):
        assert all(
            module.startswith("transformers_modules.")
            for key, module in report[name].items()
            if key in ("config", "classifier", "model", "backbone")
        )
        assert torch.equal(outputs[f"{name}/logits"], expected.logits)
        assert torch.equal(outputs[f"{name}/hierarchy"], torch.stack(expected.hierarchy, 1))
        assert torch.equal(outputs[f"{name}/last_hidden_state"], expected_tokens)
    assert torch.equal(outputs["hub/level2"], expected_level2)

    # Pipelines: the remote-code classes, the package's results.
    for task in tasks:
        assert report["local"][f"{task}/class"].startswith("transformers_modules.") or task in (
            "image-classification",
            "image-feature-extraction",
        )  # transformers' own pipelines, remote model
    assert report["local"]["hierarchical-segmentation/class"].endswith(".pipelines.HierarchicalSegmentationPipeline")
    assert report["local"]["image-segmentation/class"].endswith(".pipelines.CastImageSegmentationPipeline")
    assert [r["label"] for r in report["local"]["image-classification"]] == [r["label"] for r in expected_classes]
    assert [r["score"] for r in report["local"]["image-classification"]] == pytest.approx(
        [r["score"] for r in expected_classes], abs=1e-6
    )
    assert torch.equal(outputs["local/image-feature-extraction"], expected_pooled)
    assert report["local"]["image-segmentation"] == expected_segments
    for name in ("local", "hub", "offline"):
        parents = [{int(k): v for k, v in level.items()} for level in report[name]["hierarchical-segmentation"]]
        for level, expected_level in enumerate(expected_levels["levels"]):
            assert parents[level] == {s["id"]: s["parent"] for s in expected_level["segments"]}
            assert np.array_equal(
                outputs[f"{name}/hierarchical-segmentation/{level + 1}"].numpy(), expected_level["segmentation"]
            )
