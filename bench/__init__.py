"""lorakern's benchmark harness.

``python -m bench.run`` times every provider of a LoRA linear layer in one
process on the same inputs and writes ``bench/results/<device>-<date>.{json,md,png}``;
``pytest bench/`` runs the same layers as pytest-benchmark microbenchmarks.

Modules: ``cases`` (shapes, presets, inputs), ``composition`` (the cuBLAS
``addmm_`` LoRA with its hand-written backward), ``providers`` (the provider
table), ``metrics`` (timing, FLOPs, memory, saved bytes, environment),
``layers`` (one case, every provider and mode), ``e2e`` (a training step of a
Llama-style decoder), ``report`` (table, markdown, JSON, PNG).
"""
