"""The training engine: the one loop, optimisers, checkpoints, seeding, model building."""
