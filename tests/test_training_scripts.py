"""The training scripts end to end: a run killed with SIGKILL resumes with the same losses, two processes under
`accelerate launch` split the data and end with identical weights, and the outputs load with the Auto classes and
are published to a (local) Hub with a model card."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from launching import accelerate_launch

from hf_hierseg.evaluation.synthetic import write_synthetic_dataset
from hf_hierseg.training.arguments import moco_parser, supervised_parser
from hf_hierseg.training.loop import METRICS_FILE, read_metrics
from hf_hierseg.training.recipes import train_moco, train_supervised

from cast_testing import CastModelTester


REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--config_name",
    "cast-small",
    "--config_overrides",
    *CastModelTester(image_size=32).config_overrides("projection_dim=16", "projection_hidden_dim=32"),
    "--num_superpixels",
    "600",
    "--report_to",
    "jsonl",
    "--logging_steps",
    "1",
]
# huggingface_hub's own LFS upload passes `data=` to httpx; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")


@pytest.fixture(autouse=True)
def one_thread_and_fresh_accelerate_state(one_torch_thread):
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """Synthetic shapes (6 classes, 32 px) as parquet: `train` (48 images) and `test` (12)."""
    root = write_synthetic_dataset(
        tmp_path_factory.mktemp("shapes"), num_images=48, num_test_images=12, image_size=32, format="parquet"
    )
    return str(root / "data")


def script_environment():
    environment = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    environment.pop("ACCELERATE_USE_CPU", None)
    return environment


def losses_by_step(output_dir):
    """The logged loss of every step; a step logged twice (before a kill and after the resume) keeps the last."""
    return {line["step"]: line["loss"] for line in read_metrics(Path(output_dir) / METRICS_FILE) if "loss" in line}


def fingerprint(output_dir, rank=0):
    return json.loads((Path(output_dir) / f"train_summary_rank{rank}.json").read_text())["parameter_fingerprint"]


@pytest.mark.slow
def test_a_run_killed_with_sigkill_resumes_with_the_same_losses(shapes, tmp_path):
    arguments = [
        "--dataset_name",
        shapes,
        *TINY,
        "--per_device_train_batch_size",
        "4",
        "--max_train_steps",
        "8",
        "--num_warmup_steps",
        "2",
        "--checkpointing_steps",
        "3",
        "--checkpoints_total_limit",
        "2",
        "--dataloader_num_workers",
        "2",
        "--learning_rate",
        "1e-3",
    ]
    reference = tmp_path / "uninterrupted"
    train_moco(*moco_parser().parse_args_into_dataclasses(args=[*arguments, "--output_dir", str(reference)]))

    killed = tmp_path / "killed"
    command = [sys.executable, str(REPO_ROOT / "scripts" / "train_moco.py"), *arguments, "--output_dir", str(killed)]
    process = subprocess.Popen(
        command, env=script_environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    deadline = time.monotonic() + 240
    while not (killed / "checkpoint-3").is_dir():
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint-3 after 240 s"
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL
    try:
        os.killpg(process.pid, signal.SIGKILL)  # its DataLoader workers, if still alive
    except ProcessLookupError:
        pass
    process.stderr.close()
    assert not (killed / "model.safetensors").exists()  # killed before the end
    logged_before_kill = losses_by_step(killed)
    assert max(logged_before_kill) < 8

    resumed = subprocess.run(
        [*command, "--resume_from_checkpoint", "latest"],
        env=script_environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resumed from" in resumed.stderr
    expected, got = losses_by_step(reference), losses_by_step(killed)
    assert sorted(got) == list(range(1, 9))
    for step in range(1, 9):
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), f"step {step}"
    assert fingerprint(killed) == fingerprint(reference)
    # Atomic checkpoints: only complete ones, at most --checkpoints_total_limit, no temporary folder left.
    assert sorted(path.name for path in killed.iterdir() if "checkpoint" in path.name) == [
        "checkpoint-6",
        "checkpoint-8",
    ]


@pytest.mark.slow
def test_two_processes_split_the_data_and_end_with_identical_weights(shapes, tmp_path):
    output_dir = tmp_path / "two_processes"
    command = [
        *accelerate_launch(2),
        str(REPO_ROOT / "scripts" / "train_moco.py"),
        "--dataset_name",
        shapes,
        *TINY,
        "--per_device_train_batch_size",
        "4",
        "--max_train_steps",
        "3",
        "--gradient_accumulation_steps",
        "2",
        "--max_grad_norm",
        "1.0",
        "--log_sample_keys",
        "--output_dir",
        str(output_dir),
    ]
    environment = dict(script_environment(), ACCELERATE_USE_CPU="true")
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = [json.loads((output_dir / f"train_summary_rank{rank}.json").read_text()) for rank in range(2)]
    assert [summary["num_processes"] for summary in summaries] == [2, 2]
    assert summaries[0]["parameter_fingerprint"] == summaries[1]["parameter_fingerprint"]
    # 3 steps x 2 micro-batches x 4 images = 24 records per process: one epoch of its half of the 48 images.
    seen = []
    for rank in range(2):
        records = [line.split("\t") for line in (output_dir / f"sample_keys_rank{rank}.txt").read_text().splitlines()]
        assert [epoch for _, epoch, _ in records] == ["0"] * 24
        seen.append({key for _, _, key in records})
        assert len(seen[rank]) == 24
    assert seen[0].isdisjoint(seen[1]) and len(seen[0] | seen[1]) == 48
    # Metrics are reduced over both processes: 48 samples in all.
    assert read_metrics(output_dir / METRICS_FILE)[-1]["samples_seen"] == 48


@pytest.mark.slow
def test_supervised_run_saves_auto_loadable_outputs_and_publishes_them(shapes, tmp_path, hub_server):
    from huggingface_hub import HfApi, ModelCard
    from PIL import Image
    from transformers import AutoModel, AutoModelForImageClassification

    from hf_hierseg.image_processing_cast import CastImageProcessor

    output_dir = tmp_path / "supervised"
    arguments = supervised_parser().parse_args_into_dataclasses(
        args=[
            "--dataset_name",
            shapes,
            *TINY,
            "--output_dir",
            str(output_dir),
            "--per_device_train_batch_size",
            "8",
            "--max_train_steps",
            "3",
            "--model_ema",
            "--model_ema_decay",
            "0.9",
            "--eval_steps",
            "2",
            "--push_to_hub",
            "--hub_model_id",
            "tester/cast-tiny-shapes",
        ]
    )
    metrics = train_supervised(*arguments)
    assert metrics["eval_samples"] == 12 and 0.0 <= metrics["eval_accuracy"] <= 1.0
    assert {"eval_accuracy_ema", "eval_loss_ema"} <= set(metrics)
    logged = read_metrics(output_dir / METRICS_FILE)
    assert [line["step"] for line in logged if "eval_accuracy" in line] == [2, 3]

    local = AutoModelForImageClassification.from_pretrained(output_dir)
    assert local.config.id2label[0] == "house" and local.config.num_labels == 6
    assert type(AutoModel.from_pretrained(output_dir)).__name__ == "CastModel"
    assert (output_dir / "ema" / "model.safetensors").is_file()
    # The image processor computes superpixels as training did (DeiT SEEDS recipe, 600 per 224^2, 32 px crops).
    processor = CastImageProcessor.from_pretrained(output_dir)
    assert (processor.superpixel_recipe, processor.num_superpixels) == ("supervised", 600)
    assert processor.crop_size == {"height": 32, "width": 32}
    image = Image.new("RGB", (48, 40), (200, 30, 30))
    with torch.no_grad():
        logits = local(**processor(images=image, return_tensors="pt")).logits
    assert logits.shape == (1, 6)

    files = set(HfApi().list_repo_files("tester/cast-tiny-shapes"))
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md", "all_results.json"} <= files
    assert not any(name.startswith("checkpoint-") for name in files)
    published = AutoModelForImageClassification.from_pretrained("tester/cast-tiny-shapes")
    for name, tensor in local.state_dict().items():
        assert torch.equal(tensor, published.state_dict()[name]), name
    card = ModelCard.load("tester/cast-tiny-shapes")
    assert card.data.pipeline_tag == "image-classification"
    for text in (
        "supervised image classification",
        "steps**: 3",
        "eval_accuracy",
        "label smoothing",
        "EMA decay",
        "ke2024cast",
        "AutoModelForImageClassification",
    ):
        assert text in card.text, text
