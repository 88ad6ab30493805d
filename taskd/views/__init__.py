"""Thin HTTP handlers: parse, call the store, answer."""
