"""Prometheus metrics (``collect``) and the HTTP endpoint serving them with
readiness (``server``)."""
