"""The shipped checkpoint: loads in one line, meets its validation bound, predicts held-out text."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax

from models import SHIPPED_CHECKPOINT, ByteTokenizer, load_pretrained
from models.checkpoint import load_config

# From Hamlet, a held-out work (never trained on).
HAMLET = """HAMLET.
To be, or not to be, that is the question:
Whether 'tis nobler in the mind to suffer
The slings and arrows of outrageous fortune,
Or to take arms against a sea of troubles,
And by opposing end them?
"""


def test_shipped_model_loads_and_meets_bound():
    lm, tok = load_pretrained()
    assert isinstance(tok, ByteTokenizer)
    config, meta = load_config(SHIPPED_CHECKPOINT)
    assert lm.config == config
    assert meta["val_nats_per_byte"] <= 1.60
    assert set(meta["held_out_works"]) == {"hamlet", "twelfth_night"}


def test_shipped_model_predicts_held_out_text():
    lm, tok = load_pretrained()
    ids = jnp.asarray([tok.encode(HAMLET)])
    logits = lm.forward(ids[:, :-1])
    nats_per_byte = float(optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean())
    # Uniform over the vocabulary would be ln(259) = 5.56; a famous, well-formed passage scores far lower.
    assert nats_per_byte < 2.0, nats_per_byte
    assert np.isfinite(nats_per_byte)
