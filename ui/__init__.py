"""The dashboard's shared pieces: caching and session state (state.py), figures (figures.py)."""
