"""Serving: the OpenAI-compatible API, the feedback API, auth and the chat page (``static/``).

``alignloop serve`` builds the app with :func:`alignloop.serve.app.create_app`.
"""
