"""Tiny random models of every supported family, built from configs in milliseconds.

They are real Hugging Face models (same code paths as a 70B one), with random weights and a
byte-level tokenizer that carries a ChatML chat template. Tests and benchmarks use them, and
`--model tiny:FAMILY` loads one from the CLI, so every command can be tried without weights.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from ssah.errors import SsahError

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Small sizes that still exercise grouped-query attention, head_dim != hidden/heads, fused
# projections, biases and Conv1D. 3 layers so per-layer logic is not trivially layer 0.
_COMMON = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4)


def _configs(vocab: int) -> dict:
    import transformers as T

    ids = dict(vocab_size=vocab, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return {
        "llama": lambda: T.LlamaConfig(**_COMMON, num_key_value_heads=2, **ids),
        "mistral": lambda: T.MistralConfig(**_COMMON, num_key_value_heads=2, **ids),
        "qwen2": lambda: T.Qwen2Config(**_COMMON, num_key_value_heads=2, **ids),
        "qwen3": lambda: T.Qwen3Config(**_COMMON, num_key_value_heads=2, head_dim=8, **ids),
        "gemma": lambda: T.GemmaConfig(**_COMMON, num_key_value_heads=1, head_dim=16, **ids),
        "gemma2": lambda: T.Gemma2Config(**_COMMON, num_key_value_heads=2, head_dim=16, **ids),
        "gemma3": lambda: T.Gemma3TextConfig(**_COMMON, num_key_value_heads=2, head_dim=16, **ids),
        "phi3": lambda: T.Phi3Config(**_COMMON, num_key_value_heads=2, **ids),
        # GPT-NeoX and GPT-2 have no grouped-query attention: value rows are owned there.
        "gpt_neox": lambda: T.GPTNeoXConfig(**_COMMON, **ids),
        "gpt2": lambda: T.GPT2Config(vocab_size=vocab, n_embd=32, n_inner=48, n_layer=3, n_head=4,
                                     bos_token_id=1, eos_token_id=2, pad_token_id=0),
    }


TINY_FAMILIES: tuple[str, ...] = tuple(_configs(8))


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (one token per UTF-8 byte) with special tokens and a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    # sorted: alphabet() comes from a hash set whose order changes from call to call.
    byte_vocab = {ch: i + len(SPECIAL_TOKENS) for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)} | byte_vocab
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(SPECIAL_TOKENS)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="<|im_end|>",
    )
    tok.chat_template = CHATML_TEMPLATE
    return tok


def tiny_model(family: str = "llama", seed: int = 0):
    """A (model, tokenizer) pair: a random `family` model in eval mode, float32, on the CPU."""
    configs = _configs(len(tiny_tokenizer()))
    if family not in configs:
        raise SsahError(f"unknown tiny family {family!r}; known: {', '.join(configs)}")
    tokenizer = tiny_tokenizer()
    config = configs[family]()
    config.eos_token_id = tokenizer.eos_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init uses std 0.02: raise it so units differ enough for scores to be informative.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.2)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval(), tokenizer
