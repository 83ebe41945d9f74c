"""From a curated manifest to NVILA checkpoints, stage by stage (Ray Train or in-process)."""
