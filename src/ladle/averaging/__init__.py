"""Averaging checkpoints: the streaming engine, member expansion, weights, recipes, soups,
EMA of weights and BatchNorm recalibration."""
