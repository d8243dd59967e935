"""Headless training: ``python Training/train.py`` (see train.py)."""
