"""Deployment tooling: a SuperLink and SuperNodes on loopback, TLS, processes by PID.

``loopback`` starts a real deployment on this machine; ``certs`` its TLS certificates and
SuperNode keys; ``processes`` starts and stops process families by PID.
"""
