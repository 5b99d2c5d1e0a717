"""What the tests run against: hubs, the multi-node test bed, fake NVML and devices,
enrolled nodes, and helpers to look into containers and drive Jupyter and noVNC.

Imported as ``support.<module>`` (tests/ is on pytest's path through its conftest).
"""
