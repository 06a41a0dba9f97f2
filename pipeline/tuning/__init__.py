"""The search space and one trial (no Ray: `pipeline.execution.ray_train.ray_tune` runs trials)."""
