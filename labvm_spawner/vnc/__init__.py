"""LabVM's browser desktop: XFCE on Xvnc, shown by noVNC next to JupyterLab.

This subpackage runs inside the user's container (it is installed into the user
image alone, see ``images.py``) and imports nothing else from ``labvm_spawner``.

The chain, every link of it local to the container and unreachable from the network::

    browser --(hub login)--> CHP --> jupyter-server-proxy (/user/<name>/desktop/)
        --unix socket--> websockify (noVNC's files + the websocket bridge)
        --unix socket--> Xvnc (display :N, no TCP listener) <-- XFCE session
"""
