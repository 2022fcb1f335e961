"""The application layer: the ``cbd-fast`` command line, the Fashion-MNIST demo, model and image IO,
reports and info."""
