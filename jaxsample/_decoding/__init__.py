"""Layer 5, decode loops: the decode core (carry, emit rule, input preparation), `generate`,
`generate_stream`, speculative decoding with its drafts, and beam search. Imports layers 0-4."""
