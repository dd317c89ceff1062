"""Memory of a QLoRA training step, measured on the CPU: what autograd saves for the
backward (bytes beyond the parameters, each storage once) for one LoRA linear over an
NF4 double-quant base, per provider:

- ``peft``: PEFT's ``lora.bnb.Linear4bit`` over bitsandbytes' ``Linear4bit``, fp32
  adapters (QLoRA as built by default);
- ``dequant-addmm``: bench/composition.py's ``DequantAddmmLoRA`` (W dequantised by
  bitsandbytes in the forward and again for dX, the LoRA term by addmm);
- ``lorakern``: ``quantized_lora_linear`` (the Triton dequantisation, in the
  interpreter here, and the cublas strategy).

Saved-tensor bytes depend on shapes and dtypes only, not on the device. The
transient buffer of the dequantised W (out x in in the compute dtype, alive during
one GEMM) is the same for all three and is reported beside them.

    python -m bench.qlora_memory --m 64 --k 1024 --n 1024 --r 16 --p 0.1

``--decoder``: the same for a training step of a whole Llama-shaped decoder, loaded
NF4 double-quant by bitsandbytes (``from_pretrained`` with a ``BitsAndBytesConfig``,
random bf16 weights, nothing downloaded), prepared as PEFT prepares QLoRA
(``prepare_model_for_kbit_training``, fp32 adapters on every linear), PEFT's model
against the same model after ``lorakern.patch_peft``: the bytes autograd saves over
the step (forward and backward of the loss; parameters and the quant states
excluded), and whether any saved tensor is a 16-bit (or fp32) copy of a base W.
Every saved tensor's shape is then rescaled from the small model's sizes to a
Llama-3-8B-shaped decoder's (each size is a distinct number here, so each dimension
names the size it is): the *predicted* saved bytes of that step on a GPU (saved
tensors depend on shapes and dtypes only).

    python -m bench.qlora_memory --decoder
"""
import argparse
import json
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402


def saved_storages(step, alive):
    """{storage: (bytes, shape, dtype)} of the distinct storages autograd saves during
    ``step()`` (which returns the loss, or an output summed as one), leaving out the
    storages of ``alive`` (parameters, quant states); the backward runs after."""
    own = {t.untyped_storage().data_ptr() for t in alive}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in own and storage.data_ptr() not in storages:
            storages[storage.data_ptr()] = (storage.nbytes(), tuple(t.shape), t.dtype)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = step()
    out.float().sum().backward()
    return storages


def saved_bytes(step, parameters):
    """Bytes of the distinct non-parameter storages autograd saves during ``step()``."""
    return sum(nbytes for nbytes, _, _ in saved_storages(step, parameters).values())


def build(m, k, n, r, p, seed=0):
    import bitsandbytes as bnb
    import peft

    torch.manual_seed(seed)
    base = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16,
                             quant_type="nf4", compress_statistics=True)
    base.load_state_dict({"weight": torch.randn(n, k).bfloat16() * 0.02}, strict=False)
    base = base.to("cpu")
    holder = torch.nn.ModuleDict({"proj": base})
    config = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=p, target_modules=["proj"])
    layer = peft.get_peft_model(holder, config).base_model.model["proj"]
    torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.02)
    x = torch.randn(m, k).bfloat16().requires_grad_()
    return layer.train(), x


def measure(m, k, n, r, p):
    import bitsandbytes.functional as bnb_functional
    from bench.composition import dequant_addmm_lora
    from lorakern.functional.quantized_weight import bnb_base_weight, quantized_lora_linear

    layer, x = build(m, k, n, r, p)
    base = layer.get_base_layer()
    lora_A, lora_B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    params = list(layer.parameters())
    scale = layer.scaling["default"]

    def dequantize():
        return bnb_functional.dequantize_4bit(base.weight.data,
                                              base.weight.quant_state).to(x.dtype)

    providers = {
        "peft": lambda: layer(x),
        "dequant-addmm": lambda: dequant_addmm_lora(x, dequantize, lora_A, lora_B, scale,
                                                    None, p),
        "lorakern": lambda: quantized_lora_linear(x, bnb_base_weight(base, "layer", x.dtype),
                                                  lora_A, lora_B, scale, None, p),
    }
    record = {"base": "nf4", "m": m, "k": k, "n": n, "r": r, "dropout_p": p,
              "transient_w_bytes": n * k * 2, "x_bytes": m * k * 2}
    for name, step in providers.items():
        record[f"saved_bytes_{name}"] = saved_bytes(step, params)
    return record


# A small Llama whose every size is a distinct number (heads 4 of 24 dims, kv heads 2:
# 48 dims), so that a saved tensor's dimension names the size it came from; and the
# Llama-3-8B-shaped decoder of as many blocks its saved shapes are rescaled to
# (bench.e2e's llama3-8b-4layers: 4 blocks, vocabulary 32000, 4 x 2048 tokens)
SMALL = dict(vocab_size=112, hidden_size=96, intermediate_size=160, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
SMALL_BATCH, SMALL_SEQ, SMALL_RANK = 3, 10, 8
LARGE = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=4,
             num_attention_heads=32, num_key_value_heads=8)
LARGE_BATCH, LARGE_SEQ, LARGE_RANK = 4, 2048, 16


def size_map():
    """{small size: large size} for every size a saved tensor's dimension can have."""
    head = SMALL["hidden_size"] // SMALL["num_attention_heads"]
    kv = head * SMALL["num_key_value_heads"]
    large_head = LARGE["hidden_size"] // LARGE["num_attention_heads"]
    pairs = {SMALL["vocab_size"]: LARGE["vocab_size"],
             SMALL["hidden_size"]: LARGE["hidden_size"],
             SMALL["intermediate_size"]: LARGE["intermediate_size"],
             SMALL["num_attention_heads"]: LARGE["num_attention_heads"],
             SMALL["num_key_value_heads"]: LARGE["num_key_value_heads"],
             head: large_head, head // 2: large_head // 2,  # rotary halves
             kv: large_head * LARGE["num_key_value_heads"],
             SMALL_BATCH: LARGE_BATCH, SMALL_SEQ: LARGE_SEQ,
             SMALL_BATCH * SMALL_SEQ: LARGE_BATCH * LARGE_SEQ, SMALL_RANK: LARGE_RANK, 1: 1}
    assert len(pairs) == 13, "two sizes of the small model coincide"
    return pairs


def _quant_state_tensors(model):
    tensors = []
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            tensors += [state.absmax, state.code]
            if state.state2 is not None:
                tensors += [state.state2.absmax, state.state2.code]
    return tensors


def _decoder(path, patched, dropout_p, checkpointing):
    import peft
    import transformers

    import lorakern

    config = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, quantization_config=config, device_map="cpu", dtype=torch.bfloat16)
    model = peft.prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = peft.LoraConfig(r=SMALL_RANK, lora_alpha=2 * SMALL_RANK, target_modules="all-linear",
                           lora_dropout=dropout_p)
    torch.manual_seed(3)
    model = peft.get_peft_model(model, lora)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # nonzero, so that the LoRA branch is real
            torch.nn.init.normal_(param, std=0.02)
    if patched:
        lorakern.patch_peft(model)
    return model.train()


def _saved_tensors(model, ids):
    """``saved_storages`` of one training step of the model on ``ids``."""
    return saved_storages(lambda: model(input_ids=ids, labels=ids).loss,
                          list(model.parameters()) + _quant_state_tensors(model))


def _rescaled_bytes(saved, sizes):
    """Saved bytes with every dimension mapped to the large model's (a storage larger
    than its tensor keeps its extra bytes unscaled); and the dimensions not mapped."""
    total, unknown = 0, set()
    for nbytes, shape, dtype in saved.values():
        element = torch.empty((), dtype=dtype).element_size()
        numel = 1
        for dim in shape:
            if dim not in sizes:
                unknown.add(dim)
            numel *= sizes.get(dim, dim)
        small = element * int(torch.tensor(shape).prod()) if shape else element
        total += numel * element + max(0, nbytes - small)
    return total, sorted(unknown)


def measure_decoder(dropout_p=0.1, checkpointing=False):
    """The decoder's record: measured saved bytes per provider (small model, CPU) and
    the *predicted* saved bytes of the Llama-3-8B-shaped step."""
    import tempfile

    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL))
    weight_shapes = {tuple(m.weight.shape) for m in model.modules()
                     if isinstance(m, torch.nn.Linear)}
    weight_shapes |= {shape[::-1] for shape in weight_shapes}
    ids = torch.randint(0, SMALL["vocab_size"], (SMALL_BATCH, SMALL_SEQ),
                        generator=torch.Generator().manual_seed(1))
    record = {"base": "nf4", "model": SMALL, "batch": SMALL_BATCH, "seq": SMALL_SEQ,
              "r": SMALL_RANK, "dropout_p": dropout_p, "gradient_checkpointing": checkpointing,
              "predicted_for": dict(LARGE, batch=LARGE_BATCH, seq=LARGE_SEQ, r=LARGE_RANK)}
    with tempfile.TemporaryDirectory() as path:
        model.to(torch.bfloat16).save_pretrained(path)
        for name, patched in (("peft", False), ("lorakern", True)):
            saved = _saved_tensors(_decoder(path, patched, dropout_p, checkpointing), ids)
            predicted, unknown = _rescaled_bytes(saved, size_map())
            record[f"saved_bytes_{name}"] = sum(b for b, _, _ in saved.values())
            record[f"saved_w_copies_{name}"] = sum(
                shape in weight_shapes and dtype != torch.uint8 for _, shape, dtype in saved.values())
            record[f"predicted_saved_bytes_{name}"] = predicted
            record[f"unmapped_dims_{name}"] = unknown
    return record


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for flag, default in (("--m", 64), ("--k", 1024), ("--n", 1024), ("--r", 16)):
        parser.add_argument(flag, type=int, default=default)
    parser.add_argument("--p", type=float, default=0.1)
    parser.add_argument("--decoder", action="store_true",
                        help="a training step of a small Llama decoder, rescaled to "
                             "Llama-3-8B's shapes")
    parser.add_argument("--checkpointing", action="store_true",
                        help="--decoder with gradient checkpointing")
    args = parser.parse_args()
    if args.decoder:
        print(json.dumps(measure_decoder(args.p, args.checkpointing)))
    else:
        print(json.dumps(measure(args.m, args.k, args.n, args.r, args.p)))


if __name__ == "__main__":
    main()
