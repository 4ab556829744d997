"""Local backend: artifacts in a folder, with file:// URLs."""
