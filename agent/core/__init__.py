"""The agent loop and the one-run pipeline; imports domain and ports only."""
