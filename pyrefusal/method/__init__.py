"""The method as values and NumPy: directions, interventions, the selection rule, refusal detection.

Nothing here imports llama_cpp or the runtime; the import contract in pyproject.toml enforces it.
"""
