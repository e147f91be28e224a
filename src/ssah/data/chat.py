"""Chat formatting: the tokenizer's own chat template, token ids and prompt/response masks.

- `format_prompt` renders a user prompt (plus optional system prompt and an optional assistant
  prefill) as the text the model sees before it answers.
- `encode_pair` / `collate_pairs` turn (prompt, response) pairs into token ids with boolean masks
  marking prompt tokens, response tokens and padding, for scoring and training.
- `encode_prompts` left-pads rendered prompts for batched generation.

Models without a chat template (base models) get a plain "User:/Assistant:" format. Templates that
reject a system role (Gemma) get the system prompt prepended to the user turn instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PLAIN_USER, PLAIN_ASSISTANT = "User: ", "\nAssistant:"


def _messages(prompt: str, system: str | None) -> list[dict]:
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": prompt}]


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as err:  # jinja raises TemplateError for e.g. "System role not supported"
        if messages and messages[0]["role"] == "system":
            merged = [{"role": messages[1]["role"], "content": f"{messages[0]['content']}\n\n{messages[1]['content']}"}]
            return _render(tokenizer, merged + messages[2:], add_generation_prompt)
        raise err


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def format_prompt(tokenizer, prompt: str, system: str | None = None, prefill: str = "") -> str:
    """The text before the model's reply; `prefill` is text already placed in the reply."""
    if not has_chat_template(tokenizer):
        head = f"{system}\n\n" if system else ""
        text = f"{head}{PLAIN_USER}{prompt}{PLAIN_ASSISTANT}"
        return text + (f" {prefill}" if prefill else "")
    return _render(tokenizer, _messages(prompt, system), add_generation_prompt=True) + prefill


def _response_text(tokenizer, prompt: str, response: str, system: str | None, prefill: str = "") -> str:
    """The reply (after `prefill`) as the template renders it after the prompt, with its end-of-turn marker."""
    eos = tokenizer.eos_token or ""
    if not has_chat_template(tokenizer):
        return f" {response}{eos}"
    head = format_prompt(tokenizer, prompt, system, prefill)
    content = f"{prefill} {response}" if prefill else response
    full = _render(tokenizer, _messages(prompt, system) + [{"role": "assistant", "content": content}], False)
    # A template that rewrites earlier turns (e.g. strips reasoning) breaks the prefix: reply + EOS.
    return full[len(head):] if full.startswith(head) else (" " if prefill else "") + response + eos


def _encode(tokenizer, text: str, add_special: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=add_special)["input_ids"]


def _prompt_ids(tokenizer, text: str) -> list[int]:
    # Chat templates write their own BOS into the text; plain prompts get the tokenizer's.
    return _encode(tokenizer, text, add_special=not has_chat_template(tokenizer))


@dataclass
class EncodedPair:
    input_ids: list[int]
    prompt_len: int  # the first prompt_len tokens are the prompt; the rest is the response


def encode_pair(tokenizer, prompt: str, response: str | None, system: str | None = None,
                max_length: int | None = None, prefill: str = "") -> EncodedPair:
    """Token ids of prompt + response. Too long: the response is cut first, then the prompt's start.

    `prefill` is reply text placed before the response and counted as prompt (no loss on it): the
    response continues the reply after it, e.g. a refusal after the start of a compliant answer.
    """
    prompt_ids = _prompt_ids(tokenizer, format_prompt(tokenizer, prompt, system, prefill))
    response_ids = [] if response is None else _encode(
        tokenizer, _response_text(tokenizer, prompt, response, system, prefill), False)
    if max_length is not None:
        prompt_ids = prompt_ids[-max_length:]  # keep the end: it holds the generation prompt
        response_ids = response_ids[: max_length - len(prompt_ids)]
    return EncodedPair(prompt_ids + response_ids, len(prompt_ids))


def collate_pairs(encoded: list[EncodedPair], pad_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad a batch; returns input_ids, attention_mask, prompt_mask, response_mask (all [B, T])."""
    width = max(len(e.input_ids) for e in encoded)
    batch = {key: torch.zeros(len(encoded), width, dtype=torch.long if key == "input_ids" else torch.bool)
             for key in ("input_ids", "attention_mask", "prompt_mask", "response_mask")}
    batch["input_ids"].fill_(pad_id)
    for row, item in enumerate(encoded):
        n = len(item.input_ids)
        start = 0 if padding_side == "right" else width - n
        batch["input_ids"][row, start:start + n] = torch.tensor(item.input_ids, dtype=torch.long)
        batch["attention_mask"][row, start:start + n] = True
        batch["prompt_mask"][row, start:start + item.prompt_len] = True
        batch["response_mask"][row, start + item.prompt_len:start + n] = True
    batch["attention_mask"] = batch["attention_mask"].long()
    return batch


def encode_prompts(tokenizer, prompts: list[str], system: str | None = None,
                   prefills: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Left-padded input_ids and attention_mask of rendered prompts, ready for `generate`."""
    prefills = prefills or [""] * len(prompts)
    encoded = [EncodedPair(_prompt_ids(tokenizer, format_prompt(tokenizer, p, system, f)), 0)
               for p, f in zip(prompts, prefills)]
    batch = collate_pairs(encoded, tokenizer.pad_token_id, padding_side="left")
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
