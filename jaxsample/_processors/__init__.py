"""Layer 3, processors and chains: filters, penalties and stateful samplers as pytrees
(`LogitsProcessor`), their composition (`Chain`) and the presets. Imports layers 0-2."""
