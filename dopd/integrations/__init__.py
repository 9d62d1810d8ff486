"""Integrations of the DOPD loss into other training frameworks (each behind its own extra)."""
