"""Datasets, mappers and the built-in shapes world."""
