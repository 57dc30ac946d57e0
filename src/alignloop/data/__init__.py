"""Records, their loading and validation, tokenisation with loss masks, and batching."""
