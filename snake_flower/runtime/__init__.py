"""What the ServerApp keeps of a run around Flower: metering, records, checkpoints, chaos.

``metering`` the Grid wrapper that counts bytes; ``recorder`` the per-round rows;
``results`` the results contract (design §6); ``checkpoint`` resume; ``chaos`` fault
injection; ``flower_patches`` every patch of Flower's internals (with ``flower_fingerprints``, the
flwr versions they were checked against).
"""
