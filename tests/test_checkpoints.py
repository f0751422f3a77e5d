"""The committed segmenter weights (experiments/checkpoints/<model>/) on real CAMUS frames.

Each checkpoint is loaded the way predict_segmenter.py loads it and segments
the ED and ES frames of a few patients of the valid split, converted at 256^2
as the README's pipeline does; the Dice against the expert masks must be in the
range its README reports. Skipped when the CAMUS copy is absent.
"""
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import camus_dir
from echo_ode_jax import metrics
from echo_ode_jax.data import camus, convert
from echo_ode_jax.segmenters.predict import predict_frames
from echo_ode_jax.segmenters.train import load_model_state

CHECKPOINTS = Path(__file__).resolve().parents[1] / "experiments" / "checkpoints"
MODELS = sorted(p.name for p in CHECKPOINTS.glob("*") if (p / "best.msgpack").exists())
CAMUS = camus_dir()


@pytest.mark.camus
@pytest.mark.skipif(not CAMUS.is_dir(), reason=f"CAMUS data not found at {CAMUS} "
                    "(set ECHO_ODE_CAMUS_DIR)")
@pytest.mark.parametrize("model", MODELS)
def test_committed_weights_segment_valid_patients(model):
  valid = set(json.loads((CAMUS / "splits.json").read_text())["valid"])
  folders = [d for d in camus.find_patients(CAMUS) if d.name in valid][:6]
  assert len(folders) == 6
  state = load_model_state(CHECKPOINTS / model, "best")
  endo, epi = [], []
  for d in folders:
    seq = convert.to_sequence(camus.read_view(d, "4CH"), size=256)
    pred = predict_frames(state, seq.img)
    endo += list(metrics.dice_per_frame(pred, seq.gt, "endo"))
    epi += list(metrics.dice_per_frame(pred, seq.gt, "epi"))
  # The READMEs report means over all 50 valid patients; 6 patients scatter more.
  assert np.mean(endo) > 0.85 and np.mean(epi) > 0.88, (model, np.mean(endo), np.mean(epi))


def test_every_checkpoint_has_its_readme_and_config():
  assert MODELS, "no checkpoint folder found"
  for model in MODELS:
    assert (CHECKPOINTS / model / "config.json").exists(), model
    assert (CHECKPOINTS / "README.md").exists()
    assert model in (CHECKPOINTS / "README.md").read_text(), model
    assert (CHECKPOINTS / model / "best.msgpack").stat().st_size <= 15 * 2**20, model
