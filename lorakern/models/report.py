"""What trains in a model: ``count_parameters``, ``format_lora_report``, ``lora_report``."""


def parameter_count(param):
    """The weights a parameter holds, counted as PEFT counts them: a bitsandbytes
    4-bit weight (``Params4bit``) packs two weights in a byte, element_size bytes an
    element (its ``quant_storage``), so it holds numel * 2 * element_size weights."""
    if type(param).__name__ == "Params4bit":
        return param.numel() * 2 * param.element_size()
    return param.numel()


def count_parameters(model):
    """(total, trainable) weight counts, each shared parameter counted once (4-bit
    weights as ``parameter_count`` says)."""
    total = trainable = 0
    for param in model.parameters():
        count = parameter_count(param)
        total += count
        if param.requires_grad:
            trainable += count
    return total, trainable


def _percent(part, whole):
    return 100.0 * part / whole if whole else 0.0


def format_lora_report(model):
    """One line per parameter (name, trainable 1/0, weights), then
    ``Total parameters: N, trainable: T (P%)``, as a string."""
    rows = [(name, int(param.requires_grad), parameter_count(param))
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
