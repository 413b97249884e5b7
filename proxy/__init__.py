"""The HTTP side of pullthrough: the OCI read API, routing, and upstream access.

The layers, top to bottom. A module imports only from its own layer or those below it,
and `cache` (storage) never imports from `proxy`.

    HTTP surface     app.py          routes, middleware, the resources the app owns (keys.py)
                     handlers.py     thin handlers: parse, call one service, respond
                     responses.py    streaming a blob body (file_sender.py, stall.py)
                     client_auth.py  logins of the mirror's own clients (htpasswd)
                     observe.py      request ids, access log, request metrics (metrics.py)
                     errors.py       the OCI error envelope for every error
    lookup rules     manifests.py    by digest / by tag, TTLs, stale-if-error
                     blobs.py        stored / filling / download, one download per blob
                     links.py        which (upstream, repository) may be served a digest
                     listings.py     tag lists and referrers: stored, TTLs, stale-if-error,
                                     referrers built from the cache (OCI 1.1 fallback)
                     routing.py      which upstream and repository a name means
                     references.py   strict parsing of names, tags and digests (ranges.py)
    upstream         upstream.py     requests, redirects, and their bookkeeping (metrics, breaker)
                     upstream_status.py       what an answer means: error, class, outcome
                     upstream_auth.py         challenges, Basic credentials, bearer tokens
                     credentials.py  docker-credential-* helpers: short-lived credentials
                     upstream_connections.py  TLS, timeouts, the downloads' share of the pool
                     breaker.py      a circuit breaker per upstream; coalesce.py
    storage          cache/          files, fills in progress, the SQLite index, eviction
    operations       cli.py          serve, warm, stats, gc, evict, fsck, export, import (warm.py)
                     layout.py       the OCI image layout: index.json, annotations, walking
                                     an image (layout_files.py: a directory or a tar)
                     layout_export.py, layout_import.py   cache -> layout, layout -> cache
                     config.py       mirror.yaml into the frozen settings.py dataclasses
                     reload.py       the live config, reloaded on SIGHUP
                     logs.py, tls.py, tasks.py
"""
