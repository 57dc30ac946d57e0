"""Simulated users with hidden preferences (``preferences.py``: what they want;
``users.py``: how they use the server and give feedback), and simulated labellers who know the
truth of a pool of traffic and judge a served classifier's predictions (``labellers.py``), for
the closed loop and its tests."""
