"""The HTTP side of pullthrough: the OCI read API, routing, and upstream access."""
