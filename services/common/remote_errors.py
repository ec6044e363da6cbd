"""Registers the exceptions of ``errors.py`` with nameko, so that a caller gets
``NotFound`` back from an RPC, not a ``RemoteError``.

``errors.py`` stays free of nameko so that domain modules may raise its
classes; every module that makes or serves RPC calls imports this one (the
portal's client in ``rpc.py``, each ``service.py``). Importing it twice is
harmless: nameko keys its registry by the class's module path.
"""

from __future__ import annotations

from nameko.exceptions import deserialize_to_instance

from services.common.errors import EXPECTED

for _exception in EXPECTED:
    deserialize_to_instance(_exception)
