"""The application layer: the ``difract`` command line and the jobs it runs.

Everything here composes the core (``capture`` → ``training`` → ``replacement`` → ``attribution``
→ ``graphs`` / ``intervene``) and the adapters; nothing here is science.
``python -m difract_ext.cli ...`` is the same as ``difract ...``.
"""

from difract_ext.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
