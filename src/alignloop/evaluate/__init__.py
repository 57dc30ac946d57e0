"""Evaluation and the reports a person reads: plots (PNG) and report.md."""
