"""Datasets, training, evaluation and the RQ fine-tuning jobs."""
