"""Adaptive rank: stable-rank estimation, RankController, resize with optimizer-state remap."""
