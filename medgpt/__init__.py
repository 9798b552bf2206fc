"""Shared code for the stage scripts: arguments, data, models, training glue and generation."""
