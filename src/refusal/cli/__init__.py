"""The ``refusal`` command: a thin layer over the Python API."""

from .app import app, main

__all__ = ["app", "main"]
