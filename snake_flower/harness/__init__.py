"""The comparison harness: head-to-head runs, their summary, report and plots.

``jobs`` runs strategies side by side in child processes; ``resume`` picks the runs a
comparison run again skips (finished, same settings); ``compare`` writes
``summary.json`` and ``report.md``; ``plots`` the figures; ``memory_table`` prints
``snake-flower memory``.
"""
