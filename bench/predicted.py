"""The static report's rows: one case's predicted phases as fwd, bwd and fwd+bwd records."""


def records(fields, provider, phases):
    """``phases`` {'fwd': (seconds, bound), 'bwd': ...}; fwd+bwd is their sum, bound
    by the slower phase's bound. ``fields`` (shape, rank, dtype, ...) go in every row."""
    fwd, bwd = phases["fwd"], phases["bwd"]
    modes = {"fwd": fwd, "bwd": bwd,
             "fwd+bwd": (fwd[0] + bwd[0], fwd[1] if fwd[0] >= bwd[0] else bwd[1])}
    return [{**fields, "provider": provider, "mode": mode,
             "predicted_ms": round(seconds * 1e3, 4), "bound": bound}
            for mode, (seconds, bound) in modes.items()]
