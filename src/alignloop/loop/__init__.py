"""The closed loop: stored feedback → datasets (``datasets.py``) → retrain → gate against the
deployed model → promote → redeploy, with lineage."""
