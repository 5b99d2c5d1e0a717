"""Monitoring for LabVM nodes: a collector usable on its own, history, Prometheus metrics,
idle-GPU reclaim, and the admin/user pages served as a hub-managed JupyterHub service.

The collector (``collector.Collector``) needs no hub; ``service`` wraps it in a tornado app.
"""

from .collector import Collector, ContainerSample, GpuSample, NodeSample, Sample

__all__ = ["Collector", "ContainerSample", "GpuSample", "NodeSample", "Sample"]
