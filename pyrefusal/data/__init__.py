"""Data: PolyRefuse (load, fetch, verify, build by translation), back-translation, the model registry."""
