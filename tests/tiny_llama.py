"""A one-layer Llama checkpoint in bf16 for the QLoRA tests (not a test module);
conftest's ``tiny_checkpoint`` fixture writes it once per test module. The
comparisons the QLoRA tests share: to bf16 rounding of the larger value."""
import torch

from oracle import TOLERANCE

TINY = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
NF4_DOUBLE_QUANT = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                        bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)


def save_tiny_checkpoint(path):
    """The bf16 checkpoint of a one-layer Llama of ``TINY``'s sizes, into ``path``."""
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY))
    model.to(torch.bfloat16).save_pretrained(path)
    return path


def assert_close_to_bf16(actual, expected, name):
    actual, expected = torch.as_tensor(actual).float(), torch.as_tensor(expected).float()
    allowed = TOLERANCE[torch.bfloat16] * expected.abs().max().item()
    error = (actual - expected).abs().max().item()
    assert error <= allowed, f"{name}: max abs error {error:.3e}, allowed {allowed:.3e}"


def assert_lora_grads_match(patched, grads):
    """Every LoRA gradient of PEFT (``grads``, by name) nonzero and matched by ``patched``."""
    assert grads and set(grads) == set(patched)
    for name, grad in grads.items():
        assert grad.abs().max() > 0, name
        assert_close_to_bf16(patched[name], grad, name)
