"""Layer 3, constraints: regex / JSON-schema / choice constraints as processors (token masks
from a token automaton). Imports layers 0-3 (processors)."""
