"""Durable jobs: checkpoints under --state-dir, their manifests, recovery and retention (docs/architecture.md)."""
