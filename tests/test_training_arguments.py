"""The trainers' settings: dataclasses parsed with `HfArgumentParser`, with the argument names and defaults the
argparse parsers had, the same choices, and checks that fail like argparse (exit status 2, one message)."""

import dataclasses

import pytest

from hf_hierseg.training.arguments import (
    LORA_ARGUMENTS,
    MOCO_ARGUMENTS,
    SEGMENTATION_ARGUMENTS,
    SUPERVISED_ARGUMENTS,
    lora_parser,
    moco_parser,
    segmentation_parser,
    supervised_parser,
)


# The names and defaults of the argparse parsers these dataclasses replace (every command line keeps working).
COMMON = {
    "dataset_name": None,
    "dataset_config_name": None,
    "train_dir": None,
    "validation_dir": None,
    "train_split_name": "train",
    "image_column_name": None,
    "streaming": False,
    "shuffle_buffer_size": 10000,
    "max_train_samples": None,
    "dataloader_num_workers": 0,
    "dataloader_timeout": 600.0,
    "cache_dir": None,
    "log_sample_keys": False,
    "model_name_or_path": None,
    "config_name": None,
    "config_overrides": None,
    "image_size": None,
    "superpixel_method": None,
    "num_superpixels": None,
    "hub_revision": None,
    "per_device_train_batch_size": 64,
    "per_device_eval_batch_size": 64,
    "optimizer": "adamw",
    "num_train_epochs": 3,
    "max_train_steps": None,
    "gradient_accumulation_steps": 1,
    "max_grad_norm": None,
    "lr_scheduler_type": "cosine",
    "num_warmup_steps": 0,
    "seed": 0,
    "max_nonfinite_steps": 0,
    "checkpointing_steps": None,
    "checkpoints_total_limit": 3,
    "resume_from_checkpoint": None,
    "logging_steps": 10,
    "report_to": "all",
    "push_to_hub": False,
    "hub_model_id": None,
    "hub_token": None,
    "hub_private_repo": False,
    "preemption_timeout": 300.0,
}
EVALUATION = {
    "validation_split_name": None,
    "train_val_split": 0.15,
    "label_column_name": None,
    "max_eval_samples": None,
    "eval_steps": None,
    "ignore_mismatched_sizes": False,
}
DEIT = {
    "label_smoothing": 0.1,
    "mixup": 0.8,
    "cutmix": 1.0,
    "mixup_prob": 1.0,
    "mixup_switch_prob": 0.5,
    "rand_augment_num_ops": 2,
    "rand_augment_magnitude": 9.0,
    "reprob": 0.25,
    "crop_min_scale": 0.08,
    "model_ema": False,
    "model_ema_decay": 0.99996,
}
EXPECTED = {
    "moco": {
        **COMMON,
        "learning_rate": 1.5e-4,
        "weight_decay": 0.1,
        "moco_temperature": 0.2,
        "moco_momentum": 0.99,
        "crop_min_scale": 0.08,
        "momentum_encoder_checkpoint": None,
    },
    "supervised": {**COMMON, **EVALUATION, **DEIT, "learning_rate": 5e-4, "weight_decay": 0.05},
    "lora": {
        **COMMON,
        **EVALUATION,
        **DEIT,
        "learning_rate": 1e-3,
        "weight_decay": 0.0,
        "label_smoothing": 0.0,
        "mixup": 0.0,
        "cutmix": 0.0,
        "rand_augment_num_ops": 0,
        "reprob": 0.0,
        "lora_r": 8,
        "lora_alpha": 16.0,
        "lora_dropout": 0.0,
        "save_merged": False,
    },
    "segmentation": {
        **COMMON,
        **EVALUATION,
        "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 8,
        "learning_rate": 1e-4,
        "weight_decay": 0.05,
        "num_labels": None,
        "id2label": None,
        "ignore_index": 255,
        "reduce_labels": False,
        "palette": None,
        "crop_min_scale": 0.25,
        "jitter_probability": 0.0,
        "segmentation_head_type": None,
    },
}
PARSERS = {
    "moco": (moco_parser, MOCO_ARGUMENTS),
    "supervised": (supervised_parser, SUPERVISED_ARGUMENTS),
    "lora": (lora_parser, LORA_ARGUMENTS),
    "segmentation": (segmentation_parser, SEGMENTATION_ARGUMENTS),
}


def flat(settings):
    values = {}
    for item in settings:
        values.update(dataclasses.asdict(item))
    return values


def parse_error(parser, argv, capsys):
    """(exit status, stderr) of a command line the parser refuses."""
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args_into_dataclasses(args=argv)
    return exit_.value.code, capsys.readouterr().err


@pytest.mark.parametrize("recipe", list(PARSERS))
def test_every_argument_keeps_its_name_and_default(recipe):
    parser_factory, dataclass_types = PARSERS[recipe]
    settings = parser_factory().parse_args_into_dataclasses(args=["--output_dir", "out"])
    assert tuple(type(item) for item in settings) == dataclass_types
    assert flat(settings) == {**EXPECTED[recipe], "output_dir": "out"}
    # The dataclasses built in Python are what the command line gives.
    assert settings == tuple(
        dataclass_type(output_dir="out") if dataclass_type.__name__ == "OutputArguments" else dataclass_type()
        for dataclass_type in dataclass_types
    )


def test_values_of_each_kind_are_parsed():
    data, model, optimization, output, evaluation, supervised = supervised_parser().parse_args_into_dataclasses(
        args=[
            "--output_dir",
            "out",
            "--streaming",
            "--config_overrides",
            "hidden_size=24",
            "depths=1,1,1,1",
            "--superpixel_method",
            "slic",
            "--report_to",
            "jsonl",
            "--learning_rate",
            "2e-3",
            "--max_grad_norm",
            "1.5",
            "--model_ema",
            "--ignore_mismatched_sizes",
            "--eval_steps",
            "4",
        ]
    )
    assert data.streaming is True and model.config_overrides == ["hidden_size=24", "depths=1,1,1,1"]
    assert model.superpixel_method == "slic" and output.report_to == "jsonl"
    assert optimization.learning_rate == 2e-3 and optimization.max_grad_norm == 1.5
    assert supervised.model_ema is True and supervised.ignore_mismatched_sizes is True and evaluation.eval_steps == 4


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--per_device_train_batch_size", "0"], "--per-device-train-batch-size: expected a positive integer, got 0"),
        (["--max_train_steps", "-3"], "--max-train-steps: expected a positive integer, got -3"),
        (["--num_superpixels", "0"], "--num-superpixels: expected a positive integer"),
        (["--logging_steps", "0"], "--logging-steps: expected a positive integer"),
        (["--lora_r", "0"], "--lora-r: expected a positive integer, got 0"),
        (["--reprob", "1.5"], "--reprob expects a value in [0, 1], got 1.5"),
        (["--lora_r", "x"], "argument --lora_r/--lora-r: expected a positive integer, got 'x'"),
        (["--report_to", "wandb"], "argument --report_to/--report-to: invalid choice: 'wandb'"),
        (["--superpixel_method", "felzenszwalb"], "invalid choice: 'felzenszwalb' (choose from 'seeds', 'slic'"),
        (["--optimizer", "sgd"], "argument --optimizer: invalid choice: 'sgd'"),
        (["--unknown-flag"], "--unknown-flag"),
    ],
)
def test_bad_values_fail_like_argparse(argv, message, capsys):
    status, err = parse_error(lora_parser(), ["--output_dir", "out", *argv], capsys)
    assert status == 2 and "Traceback" not in err
    last_line = err.strip().splitlines()[-1]  # after the usage, as argparse reports its own errors
    assert "error: " in last_line and message in last_line


def test_output_dir_is_required_and_checks_run_in_python_too(capsys):
    status, err = parse_error(moco_parser(), [], capsys)
    assert status == 2 and "--output_dir" in err
    from hf_hierseg.training.arguments import SegmentationArguments, SupervisedArguments

    with pytest.raises(ValueError, match="--num_labels expects a positive integer"):
        SegmentationArguments(num_labels=0)
    with pytest.raises(ValueError, match=r"--reprob expects a value in \[0, 1\], got 1.5"):
        SupervisedArguments(reprob=1.5)
