"""Draw the seeds' figures: the "Today's weather is so ___" distribution under temperature,
top-k and top-p, and the shipped model's next-token distribution under each filter.

    pip install -e ".[plot]"
    python scripts/plot_distributions.py --out-dir plots

Writes temperature.png, top_k.png, top_p.png and model_filters.png to --out-dir.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxsample as js  # noqa: E402

WORDS = ["wonderful", "cloudy", "nice", "hot", "gloomy", "delicious"]
LOGITS = jnp.array([1.2, 2.0, 3.5, 3.0, 1.8, 1.0])


def probs(logits) -> np.ndarray:
    return np.asarray(jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1))


def bar_grid(plt, panels, labels, title, path):
    """panels: list of (subtitle, probabilities); one bar chart per panel, side by side."""
    fig, axes = plt.subplots(1, len(panels), figsize=(3.1 * len(panels), 3.2), sharey=True)
    for ax, (subtitle, p) in zip(np.atleast_1d(axes), panels):
        bars = ax.bar(range(len(p)), p, color=["#4c72b0" if v > 0 else "#cccccc" for v in p])
        ax.set_title(subtitle, fontsize=10)
        ax.set_xticks(range(len(p)))
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=8)
        ax.set_ylim(0, 1.05)
        for b, v in zip(bars, p):
            ax.text(b.get_x() + b.get_width() / 2, v + 0.01, f"{v:.2f}", ha="center", fontsize=7)
    np.atleast_1d(axes)[0].set_ylabel("probability")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def model_panels(prompt: str, top: int):
    from models import load_pretrained

    lm, tok = load_pretrained()
    ids, lengths = tok.encode_batch([prompt])
    logits, _ = lm.prefill(jnp.asarray(ids), jnp.asarray(lengths), lm.init_cache(1, ids.shape[1]))
    logits = logits[0]
    order = np.argsort(-np.asarray(logits))[:top]
    labels = [repr(tok.decode([int(i)])) if int(i) < 256 else f"<{int(i)}>" for i in order]
    settings = [("raw", logits), ("T=0.7", js.temperature(logits, 0.7)), ("top-k 5", js.top_k(logits, 5)),
                ("top-p 0.9", js.top_p(logits, 0.9)), ("min-p 0.1", js.min_p(logits, 0.1)),
                ("typical-p 0.9", js.typical_p(logits, 0.9))]
    return [(name, probs(x)[order]) for name, x in settings], labels


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default="plots")
    p.add_argument("--prompt", default="ROMEO:\nWhat light through yonder window br",
                   help="prompt for the model's next-token plot")
    p.add_argument("--top", type=int, default=12, help="tokens shown in the model plot")
    p.add_argument("--no-model", action="store_true", help="skip the plot that needs the shipped model")
    args = p.parse_args(argv)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        p.error("plotting needs matplotlib: pip install -e '.[plot]'")
    os.makedirs(args.out_dir, exist_ok=True)
    out = lambda name: os.path.join(args.out_dir, name)
    written = [
        bar_grid(plt, [(f"T={t}", probs(js.temperature(LOGITS, t))) for t in (0.1, 0.5, 1.0, 2.0, 10.0)],
                 WORDS, "Temperature: softmax(logits / T)", out("temperature.png")),
        bar_grid(plt, [(f"top-k k={k}", probs(js.top_k(LOGITS, k))) for k in range(1, 7)],
                 WORDS, "Top-k keeps the k largest logits", out("top_k.png")),
        bar_grid(plt, [(f"top-p p={q}", probs(js.top_p(LOGITS, q))) for q in (0.3, 0.5, 0.75, 0.9, 0.95, 1.0)],
                 WORDS, "Top-p keeps the smallest set with mass >= p", out("top_p.png")),
    ]
    if not args.no_model:
        panels, labels = model_panels(args.prompt, args.top)
        written.append(bar_grid(plt, panels, labels, f"Shipped model, next byte after {args.prompt[-12:]!r}",
                                out("model_filters.png")))
    for path in written:
        print(path)


if __name__ == "__main__":
    main()
