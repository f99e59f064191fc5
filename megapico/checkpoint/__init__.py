"""Checkpoint save/resume (DeepSpeed engine + megapico state) and TP x DP resharding."""
