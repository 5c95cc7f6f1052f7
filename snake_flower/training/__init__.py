"""What a node computes and holds: window training, frozen precision, capacities, memory.

``loop`` trains a window (distillation, clipping, the memory ledger) and evaluates;
``frozen`` holds frozen layers in a lower precision; ``capacity`` node capacities and
window sizing; ``memory`` the analytic per-node memory of large language models.
"""
