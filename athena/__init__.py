"""Athena: experiments on small recursive-reasoning models and efficient adaptation."""

__version__ = "0.1.0"
