"""The application layer: command line, recipe runner, demo, comparisons. Nothing imports it."""
