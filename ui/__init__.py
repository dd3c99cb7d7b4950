"""The dashboard's shared pieces: session keys (keys.py), the sidebar (sidebar.py), caches
(cache.py, store.py), what pages do around their bodies (page.py), figures (figures.py)."""
