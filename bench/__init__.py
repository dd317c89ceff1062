"""lorakern's benchmark harness.

``python -m bench.run`` times every provider of a LoRA linear layer in one
process on the same inputs and writes ``bench/results/<device>-<date>.{json,md,png}``;
``pytest bench/`` runs the same layers as pytest-benchmark microbenchmarks;
``python -m bench.static`` predicts the same cases from the compiled code.

One module per layer type and path, the two drivers over them:

    layer type   timed (bench.run)               predicted (bench.static)
    linear       linear.py, providers.py         static_linear.py
    embedding    embedding.py                    static_embedding.py
    model        e2e.py                          -

Shared: ``cases`` (shapes, presets, inputs), ``composition`` (the cuBLAS
``addmm_`` LoRA with its hand-written backward), ``metrics`` (timing, FLOPs,
memory, saved bytes, environment), ``report`` (table, markdown, JSON, PNG);
for the predictions ``capture`` (the launches, without running them), ``sass``
(the compiled code), ``roofline`` (the machine model) and ``predicted`` (the
report's rows).
"""
