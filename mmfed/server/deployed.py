"""The ServerApp ``mmfed server`` submits to its SuperLink (``mmfed.server.deployed:app``).

The name is part of the app that ``mmfed server`` generates (``app_pyproject``), so it
stays; the app itself is ``mmfed.server.app.deployed_app``, built by the one factory.
"""

from __future__ import annotations

from mmfed.server.app import deployed_app as app

__all__ = ["app"]
