"""Launch helpers: SLURM requeue and cluster environments."""
