"""The complete training state: model weights with clean keys, the weights-only payload check,
RNG capture, the data position, and what a saved state holds (read without running code)."""
