"""The application layer: the ``cbd-fast`` command line, model and image IO, reports, info."""
