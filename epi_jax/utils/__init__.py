"""Small shared utilities (paths, cached assets from PyPI packages)."""
