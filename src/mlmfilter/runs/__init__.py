"""Run folders, the per-shard pipeline and executors."""
