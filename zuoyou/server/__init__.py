"""``zuoyou serve``: an OpenAI-compatible HTTP server with a web page, batching concurrent requests.

``create_app(pipe, ...)`` builds the FastAPI app (needs ``pip install zuoyou[serve]``); see
``zuoyou.server.app`` for the endpoints and ``zuoyou.server.batcher`` for how requests are merged.
"""

from __future__ import annotations


def create_app(pipe, **kw):
    from .app import create_app as _create_app

    return _create_app(pipe, **kw)


__all__ = ["create_app"]
