"""Scheduling: model and GPU catalogs (catalog), duration estimates (estimate), GPU memory (memory),
packing a task's configs onto a GPU (intra), placing adapters on the ranks of one run (placement),
placing tasks on a cluster (inter), and a trace-driven simulator (sim, trace)."""
