"""Typed keys for what the app owns (one owner per async resource)."""

from __future__ import annotations

from aiohttp import ClientSession, web

from cache.eviction import Evictor
from cache.store import Cache
from proxy.blobs import BlobService
from proxy.file_sender import FileSender
from proxy.listings import ListingService
from proxy.manifests import ManifestService
from proxy.metrics import Metrics
from proxy.reload import LiveConfig
from proxy.tasks import BackgroundTasks
from proxy.upstream import UpstreamClient

# The config requests are served with: read `.current` per request (SIGHUP swaps it).
CONFIG = web.AppKey("config", LiveConfig)
METRICS = web.AppKey("metrics", Metrics)
CACHE = web.AppKey("cache", Cache)
EVICTOR = web.AppKey("evictor", Evictor)
SESSION = web.AppKey("session", ClientSession)
UPSTREAM = web.AppKey("upstream", UpstreamClient)
TASKS = web.AppKey("tasks", BackgroundTasks)
MANIFESTS = web.AppKey("manifests", ManifestService)
BLOBS = web.AppKey("blobs", BlobService)
LISTINGS = web.AppKey("listings", ListingService)
SENDER = web.AppKey("sender", FileSender)
