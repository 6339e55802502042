"""The seeds' worked example (docs/sampling.md), computed with jaxsample.

"Today's weather is so ___" with six candidate tokens and their logits. Prints the
distribution under several temperatures, top-k for every k, top-p 0.5 / 0.9, min-p,
and empirical frequencies of ``jaxsample.sample`` draws next to the exact
probabilities.

Usage:
  python scripts/seeds_demo.py --draws 10000 --seed 0
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

try:
    import jaxsample as js
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import jaxsample as js

WORDS = ("wonderful", "cloudy", "nice", "hot", "gloomy", "delicious")
LOGITS = (1.2, 2.0, 3.5, 3.0, 1.8, 1.0)


def probs(logits: jax.Array) -> np.ndarray:
    """softmax of (filtered) logits as NumPy; removed tokens get 0."""
    return np.asarray(jax.nn.softmax(logits.astype(jnp.float32)))


def row(label: str, p: np.ndarray) -> str:
    return f"{label:<16}" + "".join(f"{v:>11.4f}" for v in p)


def main(draws: int = 10000, seed: int = 0) -> None:
    logits = jnp.array(LOGITS, jnp.float32)
    print(f"{'':<16}" + "".join(f"{w:>11}" for w in WORDS))
    print(row("logits", np.asarray(logits)))

    print("\nTemperature: softmax(x / T)")
    for t in (0.1, 0.5, 1.0, 2.0, 10.0):
        print(row(f"T={t:g}", probs(js.temperature(logits, t))))
    print(row("T=0 (greedy)", probs(js.temperature(logits, 0.0))))

    print("\nTop-k: keep the k largest logits")
    for k in range(1, len(WORDS) + 1):
        print(row(f"k={k}", probs(js.top_k(logits, k))))

    print("\nTop-p: smallest set of most likely tokens with mass >= p")
    for p in (0.5, 0.9):
        print(row(f"p={p:g}", probs(js.top_p(logits, p))))

    print("\nMin-p: keep q_i >= p * max(q)")
    for p in (0.05, 0.2, 0.5):
        print(row(f"min_p={p:g}", probs(js.min_p(logits, p))))

    print(f"\nSampling: {draws} draws, one key per draw (T=1)")
    keys = jax.random.split(jax.random.key(seed), draws)  # [N]
    batch = jnp.broadcast_to(logits, (draws, len(WORDS)))  # [N, V]
    tokens = np.asarray(js.sample(keys, batch))
    freq = np.bincount(tokens, minlength=len(WORDS)) / draws
    exact = probs(logits)
    print(row("exact", exact))
    print(row("empirical", freq))
    print(f"total variation distance: {0.5 * np.abs(freq - exact).sum():.4f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draws", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(args.draws, args.seed)
