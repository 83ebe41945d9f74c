"""Prefect flows (thin: they call curation, scorers and training_hooks) and the demo flow."""
