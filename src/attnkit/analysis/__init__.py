"""Attention metrics on trained models: attention sinks (more to come: head types, distances)."""

from .sinks import first_token_attention, sink_report

__all__ = ["first_token_attention", "sink_report"]
