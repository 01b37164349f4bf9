#!/usr/bin/env python
"""Train the small default CAST shipped with the package and export it into `hf_hierseg/assets/default_model/`:

    python scripts/train_default_model.py --work_dir outputs/default_model_training

MoCo v3 with the repository's trainer on crops of the real photos that PyPI wheels ship plus synthetic images
(`hf_hierseg.apps.default_model_recipe.DefaultModelRecipe`); needs PyPI (or the wheels cached) and about 30 CPU minutes on
2 cores. The same seed gives the same weights on the same machine and library versions.
"""

import argparse
import dataclasses
import json

from hf_hierseg.apps.default_model_recipe import DefaultModelRecipe, train_default_model
from hf_hierseg.default_model import DEFAULT_MODEL_DIRECTORY


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--work_dir", default="outputs/default_model_training", help="training images and the MoCo training folder"
    )
    parser.add_argument(
        "--export_dir",
        default=str(DEFAULT_MODEL_DIRECTORY),
        help="where the backbone and image processor are saved (default: the package's folder)",
    )
    defaults = DefaultModelRecipe()
    for field in dataclasses.fields(DefaultModelRecipe):
        value = getattr(defaults, field.name)
        if isinstance(value, tuple):
            parser.add_argument(f"--{field.name}", type=int, nargs="+", default=value, help=f"default: {value}")
        else:
            parser.add_argument(f"--{field.name}", type=type(value), default=value, help=f"default: {value}")
    args = parser.parse_args(argv)
    recipe = DefaultModelRecipe(
        **{
            field.name: (tuple(getattr(args, field.name)) if field.type is tuple else getattr(args, field.name))
            for field in dataclasses.fields(DefaultModelRecipe)
        }
    )
    summary = train_default_model(args.work_dir, args.export_dir, recipe)
    print(json.dumps({key: summary[key] for key in ("steps", "loss", "wall_seconds", "cpu_seconds")}, indent=1))
    print(f"Default model saved to {args.export_dir}")


if __name__ == "__main__":
    main()
