"""Reading residual-stream states: one batched forward per input set, every requested layer at once.

"Layer i" everywhere in `ssah.probe` is the output of transformer block i (0-based), read by a
forward hook on the block that the family's adapter names. We read block outputs rather than
`output_hidden_states` because Hugging Face applies the final norm to the last entry of
`hidden_states`; hooks give the same quantity at every layer, and it is exactly what the runtime
monitor reads during generation. (For layers 0..L-2 the two agree; a test checks it.)

Each sequence comes with a *readout matrix* R of shape [K, len(sequence)]: the states returned for
it are R @ states, so one forward can return several positions (one-hot rows) or averages over
spans (uniform rows). Batches are right-padded: with causal attention, padding after the last real
token cannot change any real position, so no position-id bookkeeping is needed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from operator import attrgetter

import torch

from ssah.data.chat import format_prompt, has_chat_template
from ssah.errors import SsahError
from ssah.models.adapters import adapter_for


def transformer_blocks(model) -> torch.nn.ModuleList:
    """The ModuleList of transformer blocks, found through the family adapter."""
    return attrgetter(adapter_for(model.config.model_type).layers)(model)


def num_layers(model) -> int:
    return len(transformer_blocks(model))


def validate_layers(model, layers: Sequence[int] | None, what: str = "model") -> list[int]:
    """`layers` checked against the model's depth (None means all); negative indices count from the end."""
    count = num_layers(model)
    if layers is None:
        return list(range(count))
    if not layers:
        raise SsahError(f"no layers selected; pick layer indices between 0 and {count - 1}")
    resolved = []
    for layer in layers:
        index = layer + count if layer < 0 else layer
        if not 0 <= index < count:
            raise SsahError(f"layer {layer} does not exist in {what}, which has {count} layers "
                            f"(indices 0..{count - 1})")
        if index not in resolved:
            resolved.append(index)
    return sorted(resolved)


def block_output(output) -> torch.Tensor:
    """The hidden-state tensor of a block's output (a tensor, or a tuple whose first item it is)."""
    return output[0] if isinstance(output, tuple) else output


def prompt_token_ids(tokenizer, prompt: str, system: str | None = None, prefill: str = "") -> list[int]:
    """Token ids of `format_prompt(...)`, with the same special-token rule as `ssah.data.chat`."""
    text = format_prompt(tokenizer, prompt, system=system, prefill=prefill)
    # Chat templates write their own BOS into the text; plain prompts get the tokenizer's.
    return tokenizer(text, add_special_tokens=not has_chat_template(tokenizer))["input_ids"]


class _StopForward(Exception):
    """Raised by the hook of the deepest requested layer: later layers and the LM head are not needed."""


def iter_states(model, sequences: Sequence[Sequence[int]], readouts: Sequence[torch.Tensor],
                layers: Sequence[int] | None = None, batch_size: int = 16, pad_id: int = 0,
                progress=None) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Yield (indices, states) per batch; states is float32 [B, len(layers), K, H] on the CPU.

    `readouts[i]` is a [K, len(sequences[i])] matrix (same K for all). Sequences are batched in
    order of length to waste little compute on padding; `indices` says which inputs a batch holds.
    `progress`, if given, is called with the number of sequences finished after each batch.
    """
    if len(sequences) != len(readouts):
        raise ValueError("one readout matrix per sequence is required")
    layers = validate_layers(model, layers)
    blocks = transformer_blocks(model)
    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    captured: dict[int, torch.Tensor] = {}
    current: dict[str, torch.Tensor] = {}

    def make_hook(layer: int):
        def hook(module, args, output):
            hidden = block_output(output)
            weights = current["readout"].to(hidden.device)
            captured[layer] = torch.bmm(weights, hidden.float()).cpu()  # [B, K, H]
            if layer == layers[-1]:
                raise _StopForward
        return hook

    # Calling the base model skips the LM head, whose logits (vocab-sized) we never use.
    body = getattr(model, "base_model", model)
    handles = [blocks[layer].register_forward_hook(make_hook(layer)) for layer in layers]
    try:
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            width = max(len(sequences[i]) for i in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            k = readouts[batch[0]].shape[0]
            weights = torch.zeros(len(batch), k, width)
            for row, index in enumerate(batch):
                n = len(sequences[index])
                if readouts[index].shape != (k, n):
                    raise ValueError(f"readout {index} has shape {tuple(readouts[index].shape)}, expected ({k}, {n})")
                ids[row, :n] = torch.as_tensor(sequences[index], dtype=torch.long)
                mask[row, :n] = 1
                weights[row, :, :n] = readouts[index]
            current["readout"] = weights
            captured.clear()
            with torch.no_grad():
                try:
                    body(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
                except _StopForward:
                    pass
            yield batch, torch.stack([captured[layer] for layer in layers], dim=1)
            if progress is not None:
                progress(len(batch))
    finally:
        for handle in handles:
            handle.remove()


def read_states(model, sequences: Sequence[Sequence[int]], readouts: Sequence[torch.Tensor],
                layers: Sequence[int] | None = None, batch_size: int = 16, pad_id: int = 0,
                progress=None) -> torch.Tensor:
    """All states of `iter_states` in input order: float32 [N, len(layers), K, H]."""
    out: torch.Tensor | None = None
    for indices, states in iter_states(model, sequences, readouts, layers, batch_size, pad_id, progress):
        if out is None:
            out = torch.empty(len(sequences), *states.shape[1:])
        out[indices] = states
    if out is None:
        raise SsahError("no inputs to read hidden states from; the dataset is empty")
    return out


def last_token_readout(length: int) -> torch.Tensor:
    """A [1, length] readout that picks the last position."""
    readout = torch.zeros(1, length)
    readout[0, -1] = 1.0
    return readout


def last_token_states(model, tokenizer, prompts: Sequence[str], layers: Sequence[int] | None = None,
                      batch_size: int = 16, system: str | None = None, progress=None) -> torch.Tensor:
    """States of each chat-formatted prompt's last token (the generation prompt's end): [N, L, H]."""
    sequences = [prompt_token_ids(tokenizer, prompt, system) for prompt in prompts]
    readouts = [last_token_readout(len(seq)) for seq in sequences]
    return read_states(model, sequences, readouts, layers, batch_size, pad_token_id(tokenizer), progress)[:, :, 0]


def pad_token_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id
    return pad if pad is not None else (tokenizer.eos_token_id or 0)


def request_marker(tokenizer) -> list[int]:
    """The token ids every chat-formatted request ends with: the tail the chat template (or the plain
    `User:`/`Assistant:` format) adds after the user's text to open the assistant turn. Found as the
    longest common tail of three rendered prompts that end in different characters; [] if none."""
    renders = [prompt_token_ids(tokenizer, text) for text in ("Hi", "Name a colour.", "What is 2+2?")]
    tail: list[int] = []
    for items in zip(*(reversed(ids) for ids in renders)):
        if len(set(items)) != 1:
            break
        tail.append(items[0])
    return tail[::-1]


def request_ends(input_ids: torch.Tensor, marker: list[int]) -> torch.Tensor:
    """Per row, the position of the last token of the last occurrence of `marker` (the end of the
    request, before any text already placed in the reply); the last position where it does not occur."""
    rows, width = input_ids.shape
    last = torch.full((rows,), width - 1, dtype=torch.long, device=input_ids.device)
    k = len(marker)
    if k == 0 or width < k:
        return last
    windows = input_ids.unfold(1, k, 1)  # [B, width - k + 1, k]
    hits = (windows == torch.tensor(marker, device=input_ids.device)).all(-1)
    found = hits.any(1)
    # index of the last hit: flip, take the first, map back; window j ends at position j + k - 1
    last_hit = hits.shape[1] - 1 - hits.flip(1).float().argmax(1)
    return torch.where(found, last_hit + k - 1, last)
