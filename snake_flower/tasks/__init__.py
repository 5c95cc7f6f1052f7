"""Built-in tasks: the models a run trains, cut into segments, and their data.

``task`` is the registry (``task_for``, ``build_model``, ``segment_keys``) of the vision
tasks; ``llm`` and ``llm_data`` hold task ``llm``, imported only when a run uses it;
``architectures`` the LLM presets; ``data`` loading and Flower Datasets partitioning.
"""
