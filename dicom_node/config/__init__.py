"""Node settings: ``settings`` loads and validates the TOML file, ``rules`` holds the
per-key limits, ``operations`` the sections for TLS, audit export, metrics and retention.
"""
