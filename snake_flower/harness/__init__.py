"""The comparison harness: head-to-head runs, their summary, report and plots.

``jobs`` runs strategies side by side in child processes; ``compare`` writes
``summary.json`` and ``report.md``; ``plots`` the figures; ``memory_table`` prints
``snake-flower memory``.
"""
