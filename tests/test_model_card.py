"""MODEL_CARD.md describes the weights that ship: it is what `scripts/write_model_card.py` generates from the
bundled training summary and a fresh evaluation on the held-out real photos."""

import json
from pathlib import Path

import pytest

from hf_hierseg.apps.model_card import default_model_card, evaluate_held_out_photos, read_training_summary


REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def evaluation():
    return evaluate_held_out_photos()


def test_committed_card_is_the_generated_card(evaluation):
    committed = (REPO_ROOT / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert committed == default_model_card(evaluation=evaluation), "run `python scripts/write_model_card.py`"


def test_card_figures_follow_the_training_summary(tmp_path, evaluation):
    from hf_hierseg.default_model import DEFAULT_MODEL_DIRECTORY

    summary = read_training_summary()
    card = default_model_card(evaluation=evaluation)
    for record in summary["loss"]:
        assert f"{record['loss']:.3f}" in card
    assert f"{summary['cpu_seconds']:.0f} CPU-seconds" in card
    assert f"the {summary['data']['real_photos']} ImageNet photos" in card

    # A changed summary changes the card: nothing in it is typed by hand.
    copy = tmp_path / "model"
    copy.mkdir()
    for path in Path(DEFAULT_MODEL_DIRECTORY).iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    summary["cpu_seconds"], summary["loss"][-1]["loss"] = 4321.0, 1.2345
    (copy / "training_summary.json").write_text(json.dumps(summary), encoding="utf-8")
    changed = default_model_card(copy, evaluation=evaluation)
    assert "4321 CPU-seconds" in changed and "1.234" in changed and "4321 CPU-seconds" not in card
