"""The layer store: each user's root layer as immutable, numbered versions.

A plain library with no JupyterHub import, so it can be used and tested on its
own (and from the ``labvm storage`` command line).
"""

from .errors import MergeRefused, StoreError
from .merge import merge_into_new, merge_upper
from .store import LayerStore, open_store

__all__ = ["LayerStore", "MergeRefused", "StoreError", "merge_into_new", "merge_upper",
           "open_store"]
