"""The layer store: each user's root layer as immutable, numbered versions.

A plain library with no JupyterHub import, so it can be used and tested on its
own (and from the ``labvm storage`` command line).
"""

from .store import LayerStore, StoreError, open_store

__all__ = ["LayerStore", "StoreError", "open_store"]
