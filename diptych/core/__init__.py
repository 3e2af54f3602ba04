"""Backend-neutral core: imports numpy, array-api-compat and the standard library, never a framework."""
