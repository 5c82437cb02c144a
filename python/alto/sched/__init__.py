"""Scheduling: duration estimates (estimate), GPU memory (memory), packing a task's configs onto a
GPU (intra), placing tasks on a cluster (inter), and a trace-driven simulator (sim, trace)."""
