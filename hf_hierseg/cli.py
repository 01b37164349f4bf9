"""`hf-hierseg` (also `python -m hf_hierseg`): the command line of hf_hierseg.

    hf-hierseg demo --out outputs/demo                segment a few real photos with the bundled default model
    hf-hierseg segment photos/ --out results/        overlay PNGs and the hierarchy as JSON, per image
    hf-hierseg segment --dataset_name DIR --outputs labels,json --out results/   a `datasets` image dataset
    hf-hierseg embed *.jpg --out embeddings.npy       image embeddings (or --per-token)
    hf-hierseg convert --checkpoint ckpt.pth.tar --output cast-small
    hf-hierseg train-moco ...                         also train-supervised, train-segmentation, train-hierarchical,
                                                      finetune-lora
    hf-hierseg evaluate classification ... | evaluate segmentation ... | evaluate hierarchical ...
                                                      (also open-vocabulary, segment-retrieval)
    hf-hierseg benchmark --quick                      throughput against a ViT on this machine
    hf-hierseg benchmark segment                      what segmenting photos costs, stage by stage
    hf-hierseg export-onnx --output cast.onnx         the model as ONNX for ONNX Runtime (the `onnx` extra)
    hf-hierseg check-device                           parity, compile and throughput on CUDA (skips without)
    hf-hierseg serve [--port 7860]                    the hierarchy explorer in the browser (the `demo` extra)
    hf-hierseg export-space DIR                       the same explorer as a Hugging Face Space

Every subcommand has `--help`. The user's own mistakes (wrong arguments; a missing file, folder, model or dataset; a
model that is not CAST; a device this machine lacks: `hf_hierseg.errors`) give one line on stderr and exit status 2
(arguments) or 1 (the rest); set `HF_HIERSEG_DEBUG=1` for their tracebacks. Any other exception is a bug and keeps
its traceback.
"""

import argparse
import dataclasses
import importlib
import json
import os
import sys
from pathlib import Path

from .configuration_cast import CAST_PRESETS
from .errors import InvalidInputError, UserInputError


PROG = "hf-hierseg"
EMBEDDING_SUFFIXES = (".npy", ".safetensors", ".json")


class CommandLineParser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block) that points to --help."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def adopt_parser(parser, prog):
    """A `CommandLineParser` named `prog` with the arguments, groups, defaults and help of `parser` (an
    `argparse.ArgumentParser` made elsewhere, e.g. a `transformers.HfArgumentParser`), which is left unchanged."""
    return CommandLineParser(
        prog=prog,
        parents=[parser],
        add_help=False,  # `parser`'s own -h/--help comes with its arguments
        description=parser.description,
        epilog=parser.epilog,
        formatter_class=parser.formatter_class,
        prefix_chars=parser.prefix_chars,
        fromfile_prefix_chars=parser.fromfile_prefix_chars,
        argument_default=parser.argument_default,
        conflict_handler=parser.conflict_handler,
        allow_abbrev=parser.allow_abbrev,
    )


def parsed_inputs(parser, namespace):
    """What a runner is called with: the parsed namespace, or, for an `HfArgumentParser`, its dataclasses built
    from it (as `HfArgumentParser.parse_args_into_dataclasses` builds them)."""
    dataclass_types = getattr(parser, "dataclass_types", None)
    if not dataclass_types:
        return (namespace,)
    values = vars(namespace)
    return tuple(
        dataclass_type(
            **{field.name: values[field.name] for field in dataclasses.fields(dataclass_type) if field.init}
        )
        for dataclass_type in dataclass_types
    )


def import_object(reference):
    """ "module:attribute" -> the object (a callable is returned as it is)."""
    if callable(reference):
        return reference
    module_name, attribute = reference.split(":")
    return getattr(importlib.import_module(module_name), attribute)


@dataclasses.dataclass(frozen=True)
class DelegatedCommand:
    """A subcommand whose arguments and work belong to another part of the package, imported only when it runs.

    Args:
        summary: one line for `hf-hierseg --help`.
        parser: "module:function" (or the function) making its `argparse.ArgumentParser` (an `HfArgumentParser`
            too).
        runner: "module:function" (or the function) called with the parsed namespace (with an `HfArgumentParser`:
            its dataclasses, in order); returns an exit status, or anything else for 0.
    """

    summary: str
    parser: object
    runner: object

    def run(self, prog, argv):
        parser = import_object(self.parser)()
        namespace = adopt_parser(parser, prog).parse_args(argv)
        status = import_object(self.runner)(*parsed_inputs(parser, namespace))
        return status if isinstance(status, int) else 0


@dataclasses.dataclass(frozen=True)
class CommandGroup:
    """A subcommand with kinds, `hf-hierseg NAME KIND ...`, each a `DelegatedCommand`."""

    summary: str
    kinds: dict

    def run(self, prog, argv):
        parser = CommandLineParser(prog=prog, description=self.summary)
        kinds = parser.add_subparsers(dest="kind", metavar="KIND", parser_class=CommandLineParser, required=True)
        for kind, command in self.kinds.items():
            kinds.add_parser(kind, help=f"{command.summary}; see `{prog} {kind} --help`", add_help=False)
        args, rest = parser.parse_known_args(argv)  # the kind; the rest is the kind's arguments (--help included)
        return self.kinds[args.kind].run(f"{prog} {args.kind}", rest)


@dataclasses.dataclass(frozen=True)
class CommandWithKinds:
    """A `DelegatedCommand` (`default`) whose first argument may instead name one of `kinds`, each a
    `DelegatedCommand`: `hf-hierseg NAME ...` runs `default`, `hf-hierseg NAME KIND ...` runs that kind."""

    summary: str
    default: DelegatedCommand
    kinds: dict

    def run(self, prog, argv):
        if argv and argv[0] in self.kinds:
            return self.kinds[argv[0]].run(f"{prog} {argv[0]}", argv[1:])
        parser = import_object(self.default.parser)()
        others = "; ".join(f"`{prog} {kind}`: {command.summary}" for kind, command in self.kinds.items())
        parser.epilog = "\n\n".join(filter(None, [parser.epilog, f"Also {others} (see `{prog} KIND --help`)."]))
        return DelegatedCommand(self.default.summary, lambda: parser, self.default.runner).run(prog, argv)


THROUGHPUT_BENCHMARK = DelegatedCommand(
    "throughput of CAST against a ViT on this machine (images/s, memory, time split, FLOPs)",
    "hf_hierseg.apps.benchmark_throughput:benchmark_parser",
    "hf_hierseg.apps.benchmark_throughput:run_benchmark_command",
)

DELEGATED_COMMANDS = {
    "demo": DelegatedCommand(
        "segment a few real photos with the default model (the main job, out of the box)",
        "hf_hierseg.apps.demo:demo_parser",
        "hf_hierseg.apps.demo:run_demo_command",
    ),
    "serve": DelegatedCommand(
        "the hierarchy explorer in the browser: click a region to see its parts and wholes (needs the demo extra)",
        "hf_hierseg.apps.explorer.command:serve_parser",
        "hf_hierseg.apps.explorer.command:run_serve_command",
    ),
    "export-space": DelegatedCommand(
        "write a Hugging Face Space (app.py, README header, requirements) running the hierarchy explorer",
        "hf_hierseg.apps.explorer.command:export_space_parser",
        "hf_hierseg.apps.explorer.command:run_export_space_command",
    ),
    "train-moco": DelegatedCommand(
        "self-supervised MoCo-v3 pre-training (Accelerate)",
        "hf_hierseg.training.arguments:moco_parser",
        "hf_hierseg.training.recipes:train_moco",
    ),
    "train-supervised": DelegatedCommand(
        "supervised classification training, DeiT recipe (Accelerate)",
        "hf_hierseg.training.arguments:supervised_parser",
        "hf_hierseg.training.recipes:train_supervised",
    ),
    "train-segmentation": DelegatedCommand(
        "semantic segmentation fine-tuning on image + mask pairs (Accelerate)",
        "hf_hierseg.training.arguments:segmentation_parser",
        "hf_hierseg.training.segmentation:train_segmentation",
    ),
    "train-hierarchical": DelegatedCommand(
        "H-CAST hierarchical classification along a taxonomy (Accelerate)",
        "hf_hierseg.training.hierarchical:hierarchical_parser",
        "hf_hierseg.training.hierarchical:train_hierarchical",
    ),
    "finetune-lora": DelegatedCommand(
        "LoRA fine-tuning of a classifier with peft (Accelerate)",
        "hf_hierseg.training.arguments:lora_parser",
        "hf_hierseg.training.lora:finetune_lora",
    ),
    "evaluate": CommandGroup(
        "evaluate a model: `evaluate classification ...` (top-k, kNN), `evaluate segmentation ...` (mIoU, boundary F), "
        "`evaluate open-vocabulary ...`, `evaluate hierarchical ...` (H-CAST), `evaluate segment-retrieval ...`",
        {
            "classification": DelegatedCommand(
                "top-1 / top-5 accuracy and kNN accuracy on a labelled dataset",
                "hf_hierseg.apps.evaluate:classification_parser",
                "hf_hierseg.apps.evaluate:run_classification",
            ),
            "segmentation": DelegatedCommand(
                "part-whole segmentation against masks, beside the ViT + k-means baseline",
                "hf_hierseg.apps.evaluate:segmentation_parser",
                "hf_hierseg.apps.evaluate:run_segmentation",
            ),
            "open-vocabulary": DelegatedCommand(
                "objects and parts named by CLIP (the paper's PartImageNet protocol)",
                "hf_hierseg.apps.evaluate:open_vocabulary_parser",
                "hf_hierseg.apps.evaluate:run_open_vocabulary",
            ),
            "hierarchical": DelegatedCommand(
                "H-CAST: per-level top-1, full-path accuracy and tree consistency along a taxonomy",
                "hf_hierseg.apps.evaluate_hierarchical:hierarchical_parser",
                "hf_hierseg.apps.evaluate_hierarchical:run_hierarchical",
            ),
            "segment-retrieval": DelegatedCommand(
                "segments labelled by nearest training segments (the paper's VOC protocol)",
                "hf_hierseg.apps.evaluate:segment_retrieval_parser",
                "hf_hierseg.apps.evaluate:run_segment_retrieval",
            ),
        },
    ),
    "export-onnx": DelegatedCommand(
        "export a CAST model to ONNX (dynamic batch, static token budget) with its processor (needs the onnx extra)",
        "hf_hierseg.apps.export_onnx:export_onnx_parser",
        "hf_hierseg.apps.export_onnx:run_export_onnx_command",
    ),
    "check-device": DelegatedCommand(
        "CAST on a CUDA device: parity with the CPU, compile, throughput against ViT-S (skips without CUDA)",
        "hf_hierseg.apps.check_device:check_device_parser",
        "hf_hierseg.apps.check_device:run_check_device_command",
    ),
    "benchmark": CommandWithKinds(
        "throughput of CAST against a ViT on this machine (`benchmark`, `benchmark throughput`) or what segmenting "
        "photos costs, stage by stage (`benchmark segment`)",
        THROUGHPUT_BENCHMARK,
        {
            "throughput": THROUGHPUT_BENCHMARK,
            "segment": DelegatedCommand(
                "processor, forward, post-processing, writing and the pipeline / `segment` totals per photo",
                "hf_hierseg.apps.benchmark_segment:benchmark_segment_parser",
                "hf_hierseg.apps.benchmark_segment:run_benchmark_segment_command",
            ),
        },
    ),
}


# ---------------------------------------------------------------------------------------------------------------
# segment, embed, convert


def add_model_arguments(parser, device_default="cpu", device_help="cpu"):
    parser.add_argument("--model", help="model folder or Hub id (default: the model installed with the package)")
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run the model repo's own code instead of this package's classes",
    )
    parser.add_argument(
        "--device", default=device_default, help=f"torch device, e.g. cpu, cuda, cuda:1 (default: {device_help})"
    )
    parser.add_argument("--batch-size", type=positive_int, default=1, help="images per model call (default: 1)")
    parser.add_argument("--superpixel-method", choices=("seeds", "slic", "grid"), help="override the processor's")
    parser.add_argument("--num-superpixels", type=positive_int, help="superpixels per 224x224 pixels (override)")


def load_model(args):
    """The model and processor of `add_model_arguments`' arguments (`loading.load_model_and_processor`)."""
    from .loading import load_model_and_processor

    overrides = {"superpixel_method": args.superpixel_method, "num_superpixels": args.num_superpixels}
    return load_model_and_processor(
        args.model, trust_remote_code=args.trust_remote_code, device=args.device, processor_overrides=overrides
    )


def positive_int(value):
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return number


def command_segment(args):
    from .apps.bulk_segment import run_segment_command

    if bool(args.images) == (args.dataset_name is not None):
        args.parser.error("give IMAGE files, folders or globs, or --dataset_name (one of the two)")
    return run_segment_command(args, load_model)


def save_embeddings(path, embeddings, names):
    import numpy as np

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npy":
        np.save(path, embeddings)
    elif path.suffix == ".safetensors":
        from safetensors.numpy import save_file

        save_file({"embeddings": np.ascontiguousarray(embeddings)}, str(path), metadata={"images": json.dumps(names)})
    else:
        path.write_text(json.dumps({"images": names, "embeddings": embeddings.tolist()}) + "\n", encoding="utf-8")


def command_embed(args):
    import numpy as np
    from transformers import pipeline

    from .apps.segment_images import expand_images

    if Path(args.out).suffix not in EMBEDDING_SUFFIXES:
        raise InvalidInputError(f"--out must end in .npy, .safetensors or .json, got {Path(args.out).name!r}")
    images = expand_images(args.images)
    model, processor = load_model(args)
    extractor = pipeline("image-feature-extraction", model=model, image_processor=processor, device=model.device)
    features = extractor([str(path) for path in images], pool=not args.per_token, batch_size=args.batch_size)
    embeddings = np.stack([np.asarray(feature, dtype=np.float32)[0] for feature in features])
    save_embeddings(args.out, embeddings, [str(path) for path in images])
    print(f"{len(images)} embeddings {tuple(embeddings.shape)} -> {args.out}")
    return 0


def command_convert(args):
    from .convert import convert_checkpoint, parse_overrides, publish_converted

    _, report = convert_checkpoint(
        args.checkpoint,
        args.output,
        args.preset,
        parse_overrides(args.set),
        args.allow_argparse_namespace,
        taxonomy=args.taxonomy,
    )
    for line in report.lines():
        print(line)
    print(f"saved to {args.output}")
    if args.push_to_hub:
        print(publish_converted(args.output, args.push_to_hub, report))
    return 0


# ---------------------------------------------------------------------------------------------------------------


def build_parser():
    parser = CommandLineParser(prog=PROG, description="CAST hierarchical segmentation for Hugging Face.")
    subcommands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=CommandLineParser)
    subcommands.required = True

    segment = subcommands.add_parser(
        "segment",
        help="segment images: overlay PNGs per level and the hierarchy as JSON",
        description="Segment images (files, folders, globs or a `datasets` image dataset) with a CAST model; writes "
        "into --out, per image (by default): IMAGE_level<l>.png (the segments over the image), "
        "IMAGE_hierarchy.png (all levels side by side: boundaries and mean colours) and IMAGE.json (per level: "
        "segments with parent, area and bounding box); with `labels` among --outputs also "
        "IMAGE_level<l>_labels.png (16-bit segment ids). Plus index.jsonl (or .parquet): one row per image. A run "
        "started again skips the images whose outputs are complete. Under `accelerate launch` each process "
        "segments its own share of the images.",
    )
    segment.add_argument("images", nargs="*", metavar="IMAGE", help="image files, folders of images or glob patterns")
    segment.add_argument("--out", required=True, help="output folder")
    segment.add_argument(
        "--outputs",
        default="overlays,hierarchy,json",
        help="comma-separated: overlays, hierarchy, labels, json, or pictures (= overlays,hierarchy), all "
        "(default: overlays,hierarchy,json)",
    )
    segment.add_argument(
        "--index-format", "--index_format", choices=("jsonl", "parquet"), default="jsonl", help="index file format"
    )
    dataset = segment.add_argument_group("a `datasets` image dataset instead of files")
    dataset.add_argument("--dataset-name", "--dataset_name", help="Hub id or local folder / files of a dataset")
    dataset.add_argument("--dataset-config-name", "--dataset_config_name", help="the dataset's configuration")
    dataset.add_argument("--split", default="train", help="split to segment (default: train)")
    dataset.add_argument("--image-column", "--image_column", help="column of the images (default: the first Image)")
    dataset.add_argument("--streaming", action="store_true", help="stream the dataset instead of downloading it")
    segment.add_argument(
        "--levels",
        type=int,
        nargs="+",
        default=[1, 2, 3, 4],
        choices=range(5),
        metavar="LEVEL",
        help="levels to write, 0 (superpixels) to 4 (default: 1 2 3 4)",
    )
    add_model_arguments(segment, device_default=None, device_help="this process's accelerate device")
    segment.add_argument(
        "--num-workers", type=positive_int, help="threads decoding, processing and writing images (default: all cores)"
    )
    segment.add_argument("--quiet", action="store_true", help="no progress bar and no line per image")
    segment.set_defaults(handler=command_segment, parser=segment)

    embed = subcommands.add_parser(
        "embed",
        help="image embeddings (pooled, or per token) to .npy / .safetensors / .json",
        description="Compute CAST image embeddings: [N, C] pooled, or [N, 1 + tokens, C] with --per-token.",
    )
    embed.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders of images")
    embed.add_argument("--out", required=True, help="output file: .npy, .safetensors or .json")
    embed.add_argument("--per-token", action="store_true", help="last-level tokens instead of the pooled embedding")
    add_model_arguments(embed)
    embed.set_defaults(handler=command_embed)

    convert = subcommands.add_parser(
        "convert",
        help="convert an original CAST checkpoint to a Hugging Face model folder",
        description="Convert an original CAST checkpoint (MoCo-v3, DeiT, segmentation, H-CAST or a state dict).",
    )
    convert.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint_XXXX.pth.tar, checkpoint.pth or a state dict; a path or hf://<owner>/<repo>[@rev]/<file>",
    )
    convert.add_argument(
        "--taxonomy",
        default=None,
        help="H-CAST checkpoints: taxonomy.json (levels, finest first) or H-CAST's data/*_tree.json rows "
        "[fine, coarse(, coarser)]; a path or hf://...",
    )
    convert.add_argument("--output", required=True, help="output folder")
    convert.add_argument(
        "--preset", choices=sorted(CAST_PRESETS), help="the architecture, when the tensors leave it open"
    )
    convert.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config field, lists comma-separated (e.g. num_clusters=32,16,8,4); repeatable",
    )
    convert.add_argument(
        "--allow-argparse-namespace",
        action="store_true",
        help="allow the argparse.Namespace that DeiT checkpoints keep under `args`",
    )
    convert.add_argument("--push-to-hub", metavar="REPO", help="also publish the converted model to this Hub repo")
    convert.set_defaults(handler=command_convert)

    for name, command in DELEGATED_COMMANDS.items():
        # Listed for --help; `main` hands their arguments to the command before this parser sees them.
        subcommands.add_parser(name, help=f"{command.summary}; see `{PROG} {name} --help`", add_help=False)
    return parser


def report_error(command, error):
    """Print a user's mistake as one line (the traceback too with HF_HIERSEG_DEBUG=1); returns the exit status."""
    if os.environ.get("HF_HIERSEG_DEBUG"):
        raise error
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    print(f"{PROG} {command}: error: {message}", file=sys.stderr)
    return 1


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(arg) for arg in argv]
    if argv and argv[0] in DELEGATED_COMMANDS:
        command = argv[0]

        def run():
            return DELEGATED_COMMANDS[command].run(f"{PROG} {command}", argv[1:])

    else:
        args = build_parser().parse_args(argv)
        command = args.command

        def run():
            return args.handler(args)

    try:
        return run()
    except UserInputError as error:
        return report_error(command, error)


if __name__ == "__main__":
    sys.exit(main())
