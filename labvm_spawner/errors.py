"""Errors whose message is meant for a person: the user at the spawn page, or an admin."""


class LabVMError(Exception):
    """A refusal whose message is meant for the user; ``status`` is its HTTP status."""

    status = 400

    @property
    def jupyterhub_message(self) -> str:
        # JupyterHub shows this attribute, instead of "Internal Server Error", on the
        # spawn page and in REST API errors.
        return str(self)


class StoreUnreachable(LabVMError):
    """The layer store does not answer (MooseFS's master is down, say): try again later."""

    status = 503
