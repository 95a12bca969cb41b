"""`kvc bench`: fidelity, size and speed of compressed caches against the full cache and against kvpress."""
