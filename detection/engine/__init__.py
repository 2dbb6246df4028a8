"""Training engine: solver, checkpoints, distributed helpers, the loop and its runner."""
