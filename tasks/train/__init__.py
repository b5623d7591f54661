"""Training: recipes, the stage runner (Ray Train + DeepSpeed), the shard loader, evaluation."""
