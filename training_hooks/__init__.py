"""training_hooks."""
