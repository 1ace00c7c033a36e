"""Studies: ``run``, ``transfer`` and ``quant-sweep``, each a composition of the shared stages."""
