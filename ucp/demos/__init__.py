"""Chapters of ``ucp demo`` beyond the core story, one module per framework.

A chapter module defines ``TITLE`` (one line), ``available() -> bool`` (False when its
framework is not installed: the chapter is skipped) and ``run(root: Path, quiet: bool) ->
bool`` (True when every check passed; it works under ``root``, which it may create).
``ucp.demo.run_demo`` runs every available chapter after the core story, in module-name
order, and prints PASS only if all of them pass.
"""
