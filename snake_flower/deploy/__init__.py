"""Deployment tooling: a SuperLink and SuperNodes on loopback, TLS, processes by PID.

``loopback`` starts a real deployment on this machine; ``certs`` its TLS certificates and
SuperNode keys; ``processes`` starts and stops process families by PID; ``supernode``
the ``snake-flower supernode`` launcher, with ``warm_executor`` (its SuperExec) and
``warm_node`` (what its forkserver preloads).
"""
