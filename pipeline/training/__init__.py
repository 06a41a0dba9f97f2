"""The training loop, the jobs it trains (global, per group, ensembles), their results,
checkpoints, devices, threads and torch.distributed. No Ray, no MLflow."""
