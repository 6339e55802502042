"""Layer 6, sharding: vocab-parallel sampling on a device mesh and `sharded_generate`.
Imports layers 0-5."""
