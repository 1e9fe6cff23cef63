"""Evaluation: metrics (pure numpy), reports and plots."""
