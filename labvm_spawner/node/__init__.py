"""Nodes: the engine each node runs (``ops``), its HTTPS agent (``agent``), and how the
hub reaches a node, in-process or remote (``client``). No JupyterHub import here."""
