"""The meshnode agent: composition root, API, catalog, CLI."""
