"""Typed job configuration: component dataclasses composed into one `JobConfig`."""
