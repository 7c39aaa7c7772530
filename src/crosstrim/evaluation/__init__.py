"""Evaluation library: measuring what trimming changes (accuracy, agreement with the full model)."""
