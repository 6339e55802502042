"""Layer 2, filters and draws: pure `logits -> logits` filters (`top_p`, ...), the exact
samplers (`sample`, `greedy`, `gumbel_sample`), log-probs and entropy. Imports layers 0-1."""
