"""Layer 4, the sampling step: `sample_step` (process, draw, update, log-probs), its Gumbel
form, and the fused GPU step of the default chain. Imports layers 0-3."""
