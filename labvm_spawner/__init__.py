"""LabVM: a JupyterHub spawner giving each lab user a persistent root container with GPUs."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy so that the storage library and the CLI import without JupyterHub.
    if name == "LabVMSpawner":
        from .spawner import LabVMSpawner

        return LabVMSpawner
    raise AttributeError(name)


__all__ = ["LabVMSpawner", "__version__"]
