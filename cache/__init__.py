"""Storage: content-addressed blobs on disk, their SQLite index, fills in progress.

Nothing here knows about HTTP: `cache` never imports `proxy` or `aiohttp`.
"""
