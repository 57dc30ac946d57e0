"""Rollout: the reward sources an optimiser calls on (prompt, completion) batches (:mod:`.rewards`)."""
