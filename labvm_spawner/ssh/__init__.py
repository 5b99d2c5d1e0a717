"""SSH into one's own container: the gateway on the hub (``labvm-ssh``) and users' keys.

Runs on the hub's host; the sshd it reaches runs in each container (``runtime/``).
"""
