"""Chat formatting: the template is used, masks mark prompt/response/padding exactly."""

import torch

from ssah.data.chat import collate_pairs, encode_pair, encode_prompts, format_prompt
from ssah.models.tiny import tiny_tokenizer

GEMMA_LIKE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def test_prompt_uses_template_system_and_prefill():
    tok = tiny_tokenizer()
    text = format_prompt(tok, "Hi there", system="Be safe.", prefill="Sure, here")
    assert text == ("<|im_start|>system\nBe safe.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
                    "<|im_start|>assistant\nSure, here")


def test_system_prompt_merged_when_template_rejects_it():
    tok = tiny_tokenizer()
    tok.chat_template = GEMMA_LIKE
    text = format_prompt(tok, "Hi", system="Be safe.")
    assert text == "<start_of_turn>user\nBe safe.\n\nHi<end_of_turn>\n<start_of_turn>model\n"


def test_plain_format_without_template():
    tok = tiny_tokenizer()
    tok.chat_template = None
    assert format_prompt(tok, "Hi") == "User: Hi\nAssistant:"
    pair = encode_pair(tok, "Hi", "Hello")
    assert tok.decode(pair.input_ids[pair.prompt_len:]) == " Hello<|im_end|>"


def test_pair_masks_split_prompt_response_and_padding():
    tok = tiny_tokenizer()
    pairs = [encode_pair(tok, "What is 2+2?", "4"), encode_pair(tok, "Say hello in French.", "Bonjour!")]
    batch = collate_pairs(pairs, tok.pad_token_id)
    for row, pair in enumerate(pairs):
        ids = batch["input_ids"][row]
        prompt = tok.decode(ids[batch["prompt_mask"][row]])
        response = tok.decode(ids[batch["response_mask"][row]])
        assert prompt.endswith("<|im_start|>assistant\n")
        assert response.startswith(("4", "Bonjour!")) and response.rstrip().endswith("<|im_end|>")
        n = len(pair.input_ids)
        assert batch["attention_mask"][row].sum() == n
        assert not (batch["prompt_mask"][row] & batch["response_mask"][row]).any()
        assert (batch["prompt_mask"][row] | batch["response_mask"][row]).sum() == n
        assert (ids[n:] == tok.pad_token_id).all()


def test_max_length_cuts_response_first_then_prompt_start():
    tok = tiny_tokenizer()
    full = encode_pair(tok, "abc", "a long response")
    cut = encode_pair(tok, "abc", "a long response", max_length=full.prompt_len + 3)
    assert cut.prompt_len == full.prompt_len and len(cut.input_ids) == full.prompt_len + 3
    tiny = encode_pair(tok, "abc", "a long response", max_length=5)
    assert tiny.input_ids == full.input_ids[full.prompt_len - 5:full.prompt_len]


def test_generation_batch_is_left_padded():
    tok = tiny_tokenizer()
    batch = encode_prompts(tok, ["a", "a much longer prompt"])
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][0, -1] == 1
    assert (batch["input_ids"][0][batch["attention_mask"][0] == 0] == tok.pad_token_id).all()
    assert torch.equal(batch["attention_mask"][1], torch.ones_like(batch["attention_mask"][1]))


def test_tiny_tokenizer_is_the_same_every_time():
    """Reproducible runs need the tiny models' tokenizer to map text to the same ids on every build."""
    ids = {tuple(tiny_tokenizer()("Same text, same ids: 123 é")["input_ids"]) for _ in range(5)}
    assert len(ids) == 1


def test_prefill_is_prompt_and_the_response_continues_the_reply():
    """Recovery examples: the compliant start is seen (prompt mask), only the refusal after it is learned."""
    tok = tiny_tokenizer()
    pair = encode_pair(tok, "How do I hotwire a car?", "I can't help with that.", prefill="Sure, first you")
    prompt, response = tok.decode(pair.input_ids[:pair.prompt_len]), tok.decode(pair.input_ids[pair.prompt_len:])
    assert prompt.endswith("<|im_start|>assistant\nSure, first you")
    assert response == " I can't help with that.<|im_end|>\n"
    whole = encode_pair(tok, "How do I hotwire a car?", "Sure, first you I can't help with that.")
    assert tok.decode(whole.input_ids) == prompt + response
    tok.chat_template = None
    plain = encode_pair(tok, "Hi", "No.", prefill="Sure")
    assert tok.decode(plain.input_ids[:plain.prompt_len]).endswith("Assistant: Sure")
    assert tok.decode(plain.input_ids[plain.prompt_len:]) == " No.<|im_end|>"
