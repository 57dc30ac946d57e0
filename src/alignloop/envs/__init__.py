"""Simulated users with hidden preferences (``preferences.py``: what they want;
``users.py``: how they use the server and give feedback), for the closed loop and its tests."""
