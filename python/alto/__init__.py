"""ALTO: train many LoRA adapters at once over one shared frozen LLM.

The op library is the separate package :mod:`alto_ext`; this package is the orchestration layer
(registry, model injection, trainer, monitor, scheduling) built on it.
"""
__version__ = "0.1.0"
