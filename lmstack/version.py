"""lmstack's version, in a module of its own so every layer may read it (the package root
imports the engine; the server's GET /version must not import the package root)."""

__version__ = "0.1.0"
