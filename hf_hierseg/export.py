"""ONNX export of a static-budget CAST model, and an ONNX Runtime runner for it.

    from hf_hierseg.export import OnnxCastRunner, export_cast_onnx

    export_cast_onnx(model, "cast/model.onnx", processor=processor)  # also writes the processor and config beside
    runner = OnnxCastRunner("cast/model.onnx")
    outputs = runner(images)  # {"pooler_output": [B, C], "hierarchy": ([B, N], ...) ...}, numpy arrays

The graph takes `pixel_values` float32 `[batch, 3, H, W]` and `superpixels` int64 `[batch, H, W]` (H, W: the size
exported, the processor's crop) with a dynamic batch axis, and returns the model output's fields by name: tensors
under their field name (`pooler_output`, `last_hidden_state`, `logits`, ...), tuples per level as `FIELD.INDEX`
(`hierarchy.0` .. `hierarchy.3`, `sampled_indices.0`, `assignment_logits.0`, `padding_masks.0`, ...), in the order
of the output dataclass. `loss`, `hidden_states` and `attentions` are left out.

Only a model with a static token budget (`config.num_segment_tokens = N`) exports: level 1 then always has N tokens,
so no shape depends on the label values. The superpixel labels must be < N (the runner checks it before running).

The export uses `torch.onnx.export(..., dynamo=True)` (torch.export, then onnxscript). `onnx`, `onnxruntime` and
`onnxscript` are the optional `onnx` extra (`pip install "hf_hierseg[onnx]"`); they are imported only when used.

`CastOnnxConfig` describes the export in the shape of optimum's `OnnxConfig` (`inputs` / `outputs` with their
dynamic axes, `DEFAULT_ONNX_OPSET`, `ATOL_FOR_VALIDATION`, `generate_dummy_inputs`) without depending on optimum:
registering it with optimum's `TasksManager` needs optimum itself and its exporter would trace with the legacy
TorchScript exporter, which CAST's scatter-adds do not pass.
"""

import copy
import importlib
import json
from collections import OrderedDict
from dataclasses import fields, is_dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import InvalidInputError, MissingDependencyError, MissingInputError


ONNX_PACKAGES = ("onnx", "onnxruntime", "onnxscript")
DEFAULT_ONNX_OPSET = 18
# Output fields never exported: the loss needs labels; per-block states are recorded by hooks on request.
EXCLUDED_OUTPUT_FIELDS = ("loss", "hidden_states", "attentions")
CONFIG_FILE = "config.json"
METADATA_PREFIX = "hf_hierseg."
BATCH_AXIS = "batch_size"


def require_onnx_package(name):
    """Import `name` (one of `ONNX_PACKAGES`), or raise `MissingDependencyError` naming the extra to install."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise MissingDependencyError(
            f"ONNX export and ONNX Runtime need the `{name}` package, which is not installed: "
            'pip install "hf_hierseg[onnx]" (onnx, onnxruntime, onnxscript).'
        ) from error


# ---------------------------------------------------------------------------------------------------------------
# The static token budget


def static_budget_model(model, num_segment_tokens=None):
    """`model` with a static token budget: itself when `config.num_segment_tokens` is already set (and
    `num_segment_tokens` is None or equal), else a copy with `config.num_segment_tokens = num_segment_tokens`.

    Raises:
        InvalidInputError: the model has no budget and none is given, or the budget is below the first level's
            cluster count, or the model's config does not know `num_segment_tokens`.
    """
    config = model.config
    if not hasattr(config, "num_segment_tokens"):
        raise InvalidInputError(
            f"{type(model).__name__}'s config has no `num_segment_tokens` (a static token budget): this version of "
            "the model code cannot be exported to ONNX."
        )
    current = config.num_segment_tokens
    if num_segment_tokens is None:
        if current is None:
            raise InvalidInputError(
                "The model has no static token budget (config.num_segment_tokens is None: the token count follows "
                "the superpixel labels, which ONNX cannot express). Give one: num_segment_tokens=N (`hf-hierseg "
                "export-onnx --num-segment-tokens N`), N at least the number of superpixels the processor returns."
            )
        return model
    num_segment_tokens = int(num_segment_tokens)
    if num_segment_tokens < config.num_clusters[0]:
        raise InvalidInputError(
            f"num_segment_tokens={num_segment_tokens} is below the first graph pooling's cluster count "
            f"{config.num_clusters[0]} (num_clusters[0]); give at least that many tokens."
        )
    if current == num_segment_tokens:
        return model
    return copy.deepcopy(model).set_num_segment_tokens(num_segment_tokens)


def suggested_num_segment_tokens(processor, config=None):
    """The number of superpixels `processor` returns at its crop size (SEEDS: exact; other methods: the count
    requested), at least `config.num_clusters[0]`: a budget that holds every processed image's labels."""
    from .superpixels import scaled_num_superpixels, seeds_num_superpixels

    height, width = processed_size(processor)
    count = scaled_num_superpixels(height, width, processor.num_superpixels, processor.superpixel_reference_size)
    if processor.superpixel_method == "seeds":
        count = seeds_num_superpixels(height, width, count) or count
    minimum = config.num_clusters[0] if config is not None else 1
    return max(int(count), int(minimum))


def processed_size(processor):
    """(height, width) of the images `processor` returns (its crop size, or its square `size`)."""
    crop = getattr(processor, "crop_size", None)
    if getattr(processor, "do_center_crop", True) and crop is not None:
        return int(crop["height"]), int(crop["width"])
    size = processor.size
    if "height" in size:
        return int(size["height"]), int(size["width"])
    raise InvalidInputError(
        "The processor does not give images of one size (no center crop and no fixed height/width): the ONNX graph "
        "needs a fixed H x W."
    )


# ---------------------------------------------------------------------------------------------------------------
# Named outputs


def named_output_tensors(output, exclude=EXCLUDED_OUTPUT_FIELDS):
    """`[(name, tensor)]` of a model output dataclass, in field order: tensors by field name, tuples of tensors as
    `FIELD.INDEX`; None fields and `exclude` left out."""
    names = [item.name for item in fields(output)] if is_dataclass(output) else list(output.keys())
    named = []
    for name in names:
        value = getattr(output, name) if is_dataclass(output) else output[name]
        if name in exclude or value is None:
            continue
        if torch.is_tensor(value):
            named.append((name, value))
        elif isinstance(value, (tuple, list)) and all(torch.is_tensor(item) for item in value):
            named.extend((f"{name}.{index}", item) for index, item in enumerate(value))
    return named


def group_outputs(named):
    """{name: array} with `FIELD.INDEX` names -> {name: array, FIELD: (array per index)} (the model output's shape)."""
    grouped, levels = OrderedDict(), {}
    for name, value in named.items():
        field_name, _, index = name.rpartition(".")
        if field_name and index.isdigit():
            levels.setdefault(field_name, {})[int(index)] = value
            grouped.setdefault(field_name, None)
        else:
            grouped[name] = value
    for field_name, values in levels.items():
        grouped[field_name] = tuple(values[index] for index in sorted(values))
    return grouped


class NamedOutputs(nn.Module):
    """`module(**inputs)` as the tuple of `output_names` (see `named_output_tensors`): what the ONNX graph returns."""

    def __init__(self, module, input_names, output_names):
        super().__init__()
        self.module = module
        self.input_names = tuple(input_names)
        self.output_names = tuple(output_names)

    def forward(self, *inputs):
        output = self.module(**dict(zip(self.input_names, inputs)), return_dict=True)
        named = dict(named_output_tensors(output))
        missing = [name for name in self.output_names if name not in named]
        if missing:
            raise RuntimeError(f"The model output has no {missing} (it has {sorted(named)}).")
        return tuple(named[name] for name in self.output_names)


class CastOnnxConfig:
    """What the ONNX graph of a CAST model takes and returns, in the shape of optimum's `OnnxConfig`.

    Args:
        config: the model's `CastConfig` (with `num_segment_tokens` set).
        output_names: the graph's outputs, from `named_output_tensors` of one eager call (`for_model` runs it).
        image_size: (height, width) of the inputs; default the config's square `image_size`.
    """

    DEFAULT_ONNX_OPSET = DEFAULT_ONNX_OPSET
    ATOL_FOR_VALIDATION = 1e-4

    def __init__(self, config, output_names=(), image_size=None):
        self.config = config
        self.output_names = tuple(output_names)
        self.image_size = tuple(image_size) if image_size is not None else (config.image_size, config.image_size)

    @classmethod
    def for_model(cls, model, image_size=None):
        onnx_config = cls(model.config, image_size=image_size)
        with torch.no_grad():
            output = model(**onnx_config.generate_dummy_inputs(device=model.device), return_dict=True)
        onnx_config.output_names = tuple(name for name, _ in named_output_tensors(output))
        return onnx_config

    @property
    def inputs(self):
        return OrderedDict([("pixel_values", {0: BATCH_AXIS}), ("superpixels", {0: BATCH_AXIS})])

    @property
    def outputs(self):
        return OrderedDict((name, {0: BATCH_AXIS}) for name in self.output_names)

    def generate_dummy_inputs(self, batch_size=2, device="cpu", seed=0):
        """Random pixels and a grid of `num_segment_tokens` (or fewer) superpixels: labels 0..N-1 (some absent)."""
        height, width = self.image_size
        generator = torch.Generator().manual_seed(seed)
        pixel_values = torch.randn(batch_size, self.config.num_channels, height, width, generator=generator)
        budget = self.config.num_segment_tokens or self.config.num_clusters[0]
        side = max(1, int(np.sqrt(budget)))
        rows = torch.arange(height) * side // height
        columns = torch.arange(width) * side // width
        superpixels = (rows[:, None] * side + columns[None, :]).expand(batch_size, -1, -1).contiguous()
        return {"pixel_values": pixel_values.to(device), "superpixels": superpixels.to(device)}


# ---------------------------------------------------------------------------------------------------------------
# Export


def export_module_onnx(module, example_inputs, path, output_names, opset=DEFAULT_ONNX_OPSET, metadata=None):
    """Export `module` (called as `module(**inputs, return_dict=True)`) with `torch.onnx.export(dynamo=True)`:
    inputs named after `example_inputs` (an ordered dict of tensors, batch first, batch axis dynamic), outputs
    `output_names` (see `named_output_tensors`). `metadata` ({key: str}) goes into the model's metadata_props.
    Returns the path."""
    require_onnx_package("onnxscript")
    onnx = require_onnx_package("onnx")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    input_names = list(example_inputs)
    wrapper = NamedOutputs(module, input_names, output_names).eval()
    batch = torch.export.Dim(BATCH_AXIS, min=1, max=4096)
    dynamic_shapes = (tuple({0: batch} for _ in input_names),)  # NamedOutputs.forward(*inputs): one varargs tuple
    torch.onnx.export(
        wrapper,
        tuple(example_inputs[name] for name in input_names),
        str(path),
        input_names=input_names,
        output_names=list(output_names),
        opset_version=int(opset),
        dynamic_shapes=dynamic_shapes,
        dynamo=True,
        external_data=False,
        verbose=False,
    )
    if metadata:
        graph = onnx.load(str(path))
        for key, value in metadata.items():
            graph.metadata_props.add(key=METADATA_PREFIX + key, value=str(value))
        onnx.save(graph, str(path))
    return path


def export_cast_onnx(model, path, processor=None, num_segment_tokens=None, opset=DEFAULT_ONNX_OPSET):
    """Export a CAST model (`CastModel` or a head) to ONNX at `path` with a dynamic batch axis (see the module
    docstring); with `processor`, also save it (`preprocessor_config.json`) and the model config beside `path`, which
    is what `OnnxCastRunner` reads (a copy capped to the budget: `CastImageProcessor(num_segment_tokens=N)` never
    returns more labels, see `loading.static_model_and_processor`). The model is exported in float32 on the CPU, in eval mode (it is not changed:
    a copy is made where the budget or the device has to change).

    Returns:
        The `CastOnnxConfig` of the export (its `output_names` are the graph's outputs).

    Raises:
        InvalidInputError: no static token budget (see `static_budget_model`).
        MissingDependencyError: onnx / onnxscript are not installed.
    """
    require_onnx_package("onnxscript")
    require_onnx_package("onnx")
    model = static_budget_model(model, num_segment_tokens)
    if model.device.type != "cpu" or model.dtype != torch.float32 or model.training:
        model = copy.deepcopy(model).to("cpu", torch.float32).eval()
    budget = model.config.num_segment_tokens
    image_size = None
    if processor is not None:
        image_size = processed_size(processor)
        processor = copy.deepcopy(processor)
        if getattr(processor, "num_segment_tokens", None) is None or processor.num_segment_tokens > budget:
            processor.num_segment_tokens = budget  # it never returns labels outside the budget
    onnx_config = CastOnnxConfig.for_model(model, image_size=image_size)
    metadata = {
        "model_class": type(model).__name__,
        "num_segment_tokens": budget,
        "image_size": json.dumps(list(onnx_config.image_size)),
        "output_names": json.dumps(list(onnx_config.output_names)),
    }
    export_module_onnx(
        model, onnx_config.generate_dummy_inputs(), path, onnx_config.output_names, opset=opset, metadata=metadata
    )
    if processor is not None:
        processor.save_pretrained(Path(path).parent)
        model.config.save_pretrained(Path(path).parent)
    return onnx_config


# ---------------------------------------------------------------------------------------------------------------
# ONNX Runtime


class OnnxRunner:
    """An ONNX Runtime session of an exported graph: `run(**inputs)` gives {output name: numpy array}.

    Args:
        path: the `.onnx` file.
        providers: ONNX Runtime execution providers (default: CUDA when available, else CPU).
        num_threads: intra-op threads (default: ONNX Runtime's).
        allow_spinning: whether ONNX Runtime's idle intra-op threads spin-wait for the next run (its default: lower
            latency for back-to-back runs, but they hold the CPU after a run, away from other work in the process,
            e.g. a PyTorch model run next; `False` lets them sleep).
    """

    def __init__(self, path, providers=None, num_threads=None, allow_spinning=True):
        ort = require_onnx_package("onnxruntime")
        self.path = Path(path)
        if not self.path.is_file():
            raise MissingInputError(f"No ONNX model at {self.path} (export one with `hf-hierseg export-onnx`).")
        options = ort.SessionOptions()
        if num_threads is not None:
            options.intra_op_num_threads = int(num_threads)
            options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
        if providers is None:
            available = ort.get_available_providers()
            providers = [name for name in ("CUDAExecutionProvider", "CPUExecutionProvider") if name in available]
        self.session = ort.InferenceSession(str(self.path), sess_options=options, providers=providers)
        self.input_names = [item.name for item in self.session.get_inputs()]
        self.output_names = [item.name for item in self.session.get_outputs()]
        metadata = self.session.get_modelmeta().custom_metadata_map
        self.metadata = {
            key[len(METADATA_PREFIX) :]: value for key, value in metadata.items() if key.startswith(METADATA_PREFIX)
        }

    def run(self, **inputs):
        missing = [name for name in self.input_names if name not in inputs]
        if missing:
            raise InvalidInputError(f"The ONNX model needs inputs {self.input_names}; missing {missing}.")
        feeds = {name: _as_numpy(inputs[name]) for name in self.input_names}
        return OrderedDict(zip(self.output_names, self.session.run(self.output_names, feeds)))


class OnnxCastRunner(OnnxRunner):
    """ONNX Runtime for a graph from `export_cast_onnx`, with the processor saved beside it.

    `runner(images)` processes images (the saved processor) and runs the graph; `runner.run(pixel_values=...,
    superpixels=...)` runs processed inputs. Both return {output name: numpy array}, levels grouped into tuples
    (`outputs["hierarchy"][0]`) as in the model output; `run(..., grouped=False)` keeps the flat graph names.
    """

    def __init__(self, path, processor=None, providers=None, num_threads=None, allow_spinning=True):
        super().__init__(path, providers=providers, num_threads=num_threads, allow_spinning=allow_spinning)
        if "num_segment_tokens" not in self.metadata:
            raise InvalidInputError(
                f"{self.path} is not a CAST export of hf_hierseg (no num_segment_tokens metadata)."
            )
        self.num_segment_tokens = int(self.metadata["num_segment_tokens"])
        self.image_size = tuple(json.loads(self.metadata["image_size"]))
        if processor is None and (self.path.parent / "preprocessor_config.json").is_file():
            from .image_processing_cast import CastImageProcessor

            processor = CastImageProcessor.from_pretrained(self.path.parent)
        self.processor = processor

    def run(self, grouped=True, **inputs):
        pixel_values, superpixels = _as_numpy(inputs.get("pixel_values")), _as_numpy(inputs.get("superpixels"))
        if pixel_values is None or superpixels is None:
            raise InvalidInputError("The ONNX CAST model needs both `pixel_values` and `superpixels`.")
        expected = tuple(self.image_size)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[-2:]) != expected:
            raise InvalidInputError(
                f"`pixel_values` must be [B, 3, {expected[0]}, {expected[1]}] (the exported size), got "
                f"{tuple(pixel_values.shape)}."
            )
        if tuple(superpixels.shape) != (pixel_values.shape[0], *expected):
            raise InvalidInputError(
                f"`superpixels` must be [B, {expected[0]}, {expected[1]}] matching the images, got "
                f"{tuple(superpixels.shape)}."
            )
        if superpixels.size and (superpixels.min() < 0 or superpixels.max() >= self.num_segment_tokens):
            raise InvalidInputError(
                f"`superpixels` labels must be in 0..{self.num_segment_tokens - 1} (the exported token budget), got "
                f"{superpixels.min()}..{superpixels.max()}: request fewer superpixels or export with a larger "
                "--num-segment-tokens."
            )
        outputs = super().run(
            pixel_values=pixel_values.astype(np.float32, copy=False),
            superpixels=superpixels.astype(np.int64, copy=False),
        )
        return group_outputs(outputs) if grouped else outputs

    def process(self, images):
        if self.processor is None:
            raise MissingInputError(
                f"No image processor beside {self.path} (preprocessor_config.json): pass processor=..., or run "
                "processed inputs with `run(pixel_values=..., superpixels=...)`."
            )
        processed = self.processor(images, return_tensors="np")
        return {"pixel_values": processed["pixel_values"], "superpixels": processed["superpixels"]}

    def __call__(self, images, grouped=True):
        return self.run(grouped=grouped, **self.process(images))


def _as_numpy(value):
    if value is None:
        return None
    if torch.is_tensor(value):
        return value.detach().cpu().numpy()
    return np.asarray(value)


__all__ = [
    "CastOnnxConfig",
    "DEFAULT_ONNX_OPSET",
    "NamedOutputs",
    "OnnxCastRunner",
    "OnnxRunner",
    "export_cast_onnx",
    "export_module_onnx",
    "group_outputs",
    "named_output_tensors",
    "require_onnx_package",
    "static_budget_model",
    "suggested_num_segment_tokens",
]
