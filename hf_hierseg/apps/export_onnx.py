"""`hf-hierseg export-onnx --model DIR --output FILE.onnx`: a CAST model as an ONNX graph for ONNX Runtime.

Writes FILE.onnx (inputs `pixel_values`, `superpixels`; dynamic batch; outputs named after the model output's fields,
see `hf_hierseg.export`) and, beside it, the image processor (`preprocessor_config.json`) and the model config
that `hf_hierseg.export.OnnxCastRunner` reads to prepare inputs. Then checks ONNX Runtime against the PyTorch model on
one processed batch (unless --no-check) and prints the largest differences.
"""

import argparse
from pathlib import Path

import numpy as np
import torch

from ..errors import InvalidInputError
from ..export import (
    DEFAULT_ONNX_OPSET,
    OnnxCastRunner,
    export_cast_onnx,
    named_output_tensors,
    static_budget_model,
    suggested_num_segment_tokens,
)
from ..loading import load_model_and_processor


def export_onnx_parser():
    parser = argparse.ArgumentParser(
        description="Export a CAST model (backbone, classifier or segmentation model) to ONNX with a dynamic batch "
        "axis, for ONNX Runtime; the processor config is written beside the .onnx file. Needs the onnx extra "
        '(pip install "hf_hierseg[onnx]").'
    )
    parser.add_argument("--model", help="model folder or Hub id (default: the model installed with the package)")
    parser.add_argument("--output", required=True, help="the .onnx file to write")
    parser.add_argument(
        "--num-segment-tokens",
        type=int,
        help="static token budget (config.num_segment_tokens) for a model saved without one; default: the model's, "
        "or, when it has none, the number of superpixels its processor returns",
    )
    parser.add_argument(
        "--opset", type=int, default=DEFAULT_ONNX_OPSET, help=f"ONNX opset (default: {DEFAULT_ONNX_OPSET})"
    )
    parser.add_argument("--no-check", action="store_true", help="skip the ONNX Runtime check against PyTorch")
    return parser


def check_export(model, runner, images, processor):
    """Largest absolute difference per float output and the share of equal values per integer output, ONNX
    Runtime against the PyTorch model, on `images` processed by `processor`."""
    processed = processor(images, return_tensors="pt")
    inputs = {"pixel_values": processed["pixel_values"], "superpixels": processed["superpixels"]}
    with torch.no_grad():
        expected = dict(named_output_tensors(model(**inputs, return_dict=True)))
    actual = runner.run(grouped=False, **inputs)
    report = {}
    for name, value in actual.items():
        reference = expected[name].numpy()
        if np.issubdtype(value.dtype, np.floating):
            report[name] = ("max |difference|", float(np.abs(value - reference).max()))
        else:
            report[name] = ("equal", float(np.mean(value == reference)))
    return report


def run_export_onnx(model_path, output, num_segment_tokens=None, opset=DEFAULT_ONNX_OPSET, check=True, log=print):
    """Load, export, write the processor beside `output`, check. Returns the export's `CastOnnxConfig`."""
    output = Path(output)
    if output.suffix != ".onnx":
        raise InvalidInputError(f"--output must be a .onnx file, got {output.name!r}.")
    model, processor = load_model_and_processor(model_path, classifier=True)
    if num_segment_tokens is None and model.config.num_segment_tokens is None:
        num_segment_tokens = suggested_num_segment_tokens(processor, model.config)
        log(
            f"The model has no static token budget (num_segment_tokens=None); exporting with {num_segment_tokens} "
            "tokens, the number of superpixels its processor returns (--num-segment-tokens to choose)."
        )
    model = static_budget_model(model, num_segment_tokens)
    onnx_config = export_cast_onnx(model, output, processor=processor, opset=opset)
    log(
        f"{type(model).__name__} -> {output} ({output.stat().st_size / 2**20:.1f} MiB, opset {opset}, "
        f"{model.config.num_segment_tokens} segment tokens, inputs pixel_values [batch, 3, "
        f"{onnx_config.image_size[0]}, {onnx_config.image_size[1]}] and superpixels; {len(onnx_config.output_names)} "
        f"outputs: {', '.join(onnx_config.output_names)})"
    )
    log(f"processor and config -> {output.parent}")
    if check:
        from .benchmark_throughput import benchmark_images

        runner = OnnxCastRunner(output)
        size = onnx_config.image_size[0]
        report = check_export(model, runner, benchmark_images(2, size), processor)
        worst = max((value for kind, value in report.values() if kind.startswith("max")), default=0.0)
        unequal = [name for name, (kind, value) in report.items() if kind == "equal" and value < 1.0]
        log(
            f"ONNX Runtime vs PyTorch on 2 images: largest float difference {worst:.2e}; integer outputs "
            + (f"differ in {', '.join(unequal)}" if unequal else "all equal")
        )
    return onnx_config


def run_export_onnx_command(args):
    run_export_onnx(args.model, args.output, args.num_segment_tokens, args.opset, check=not args.no_check)
    return 0


__all__ = ["check_export", "export_onnx_parser", "run_export_onnx", "run_export_onnx_command"]
