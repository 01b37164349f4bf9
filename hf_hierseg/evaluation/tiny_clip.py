"""A tiny, randomly initialised CLIP for offline checks of the open-vocabulary pipeline and evaluation.

Its tokenizer is a real `CLIPTokenizer` read from a small hand-written `vocab.json` / `merges.txt`: single letters and
digits (with and without the end-of-word mark `</w>`) and a few merges for the words of the prompt
"a photo of a ...", so every name tokenizes, letter by letter. The model has random weights: its labels say nothing
about the images, only that the machinery runs. For real labels use e.g. `openai/clip-vit-base-patch16`.
"""

import json
import string
import tempfile
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor, CLIPTokenizer


BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"
CHARACTERS = tuple(string.ascii_lowercase + string.digits)
# Byte-pair merges, in priority order, that build the words of the authors' prompt.
MERGES = ("p h", "ph o", "pho t", "phot o</w>", "o f</w>")


def write_tiny_clip_vocabulary(folder):
    """Write `vocab.json` and `merges.txt` of a tiny CLIP byte-pair vocabulary into `folder`; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokens = [*CHARACTERS, *(f"{c}</w>" for c in CHARACTERS), *(merge.replace(" ", "") for merge in MERGES)]
    vocabulary = {token: index for index, token in enumerate([*tokens, BOS_TOKEN, EOS_TOKEN])}
    (folder / "vocab.json").write_text(json.dumps(vocabulary, indent=1), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n", encoding="utf-8")
    return folder


def tiny_random_clip(image_size=32, seed=0, vocabulary_folder=None):
    """`(CLIPModel, CLIPProcessor)`: a 2-layer CLIP (width 32, patch 8, `image_size` px input) with random weights
    (seeded) and a processor whose tokenizer reads the vocabulary of `write_tiny_clip_vocabulary` (written to
    `vocabulary_folder`, or a temporary folder)."""
    if vocabulary_folder is None:
        with tempfile.TemporaryDirectory() as folder:
            tokenizer = CLIPTokenizer.from_pretrained(write_tiny_clip_vocabulary(folder))
    else:
        tokenizer = CLIPTokenizer.from_pretrained(write_tiny_clip_vocabulary(vocabulary_folder))
    special = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    layers = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    config = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "max_position_embeddings": 77, **layers, **special},
        vision_config={"image_size": image_size, "patch_size": 8, **layers},
        projection_dim=16,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return model, CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


__all__ = ["write_tiny_clip_vocabulary", "tiny_random_clip"]
