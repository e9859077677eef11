"""Checkpoint readers. Each produces plain state dicts (diffusers key names) plus a config;
models never import this package."""
