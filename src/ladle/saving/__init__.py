"""Saving a run: the one save engine (triggers, commits, retention) and the CheckpointManager
that feeds it the complete training state and resumes from it."""
