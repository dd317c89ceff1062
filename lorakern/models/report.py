"""What trains in a model: ``count_parameters``, ``format_lora_report``, ``lora_report``."""


def count_parameters(model):
    """(total, trainable) element counts, each shared parameter counted once."""
    total = trainable = 0
    for param in model.parameters():
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return total, trainable


def _percent(part, whole):
    return 100.0 * part / whole if whole else 0.0


def format_lora_report(model):
    """One line per parameter (name, trainable 1/0, elements), then
    ``Total parameters: N, trainable: T (P%)``, as a string."""
    rows = [(name, int(param.requires_grad), param.numel())
            for name, param in model.named_parameters()]
    width = max((len(name) for name, _, _ in rows), default=0)
    lines = [f"{name:<{width}}  {flag}  {numel}" for name, flag, numel in rows]
    total, trainable = count_parameters(model)
    lines.append(f"Total parameters: {total}, trainable: {trainable} "
                 f"({_percent(trainable, total):.4f}%)")
    return "\n".join(lines)


def lora_report(model):
    """Prints ``format_lora_report(model)``. Returns None, so that a REPL or a
    notebook shows the report once; ``format_lora_report`` gives the text."""
    print(format_lora_report(model))
