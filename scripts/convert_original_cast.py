"""Convert an original CAST checkpoint (MoCo-v3, DeiT, H-CAST or bare state dict) to a `save_pretrained` directory.

Same as `hf-hierseg convert`: --checkpoint PATH --output DIR [--preset NAME] [--set key=value ...]
[--taxonomy TAXONOMY.json] [--allow-argparse-namespace] [--push-to-hub REPO]. PATH and TAXONOMY may be Hub files,
hf://<owner>/<repo>[@<revision>]/<path in the repo>.
"""

import sys

from hf_hierseg.cli import main


if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
