"""The evaluate stage: candidate vs baseline, promotion gates, classifier and reward-model reports."""
