"""Small policy objects asked by the save engine: triggers (when to save), retention (what to
keep), the rules that combine them, and early stopping."""
