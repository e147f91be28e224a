"""Runtime monitor: flags, stop and steer actions, batching, hook hygiene, calibration and files."""

import contextlib
import math
import random

import pytest
import torch

from ssah.data.chat import encode_prompts
from ssah.data.records import Dataset, Record
from ssah.errors import SsahError
from ssah.models.tiny import tiny_model, tiny_tokenizer
from ssah.probe.hidden import block_output, transformer_blocks
from ssah.probe.monitor import (
    Monitor,
    MonitorConfig,
    MonitorState,
    calibrate_monitor,
    monitor_from_file,
    monitored_generate,
    request_ends,
    request_marker,
    upper_quantile,
)

PROMPTS = ["Tell me a story about a dragon.", "Hi", "What is the capital of France, and why?"]
LAYER = 1
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def _unit(seed: int, size: int = 32) -> torch.Tensor:
    vector = torch.randn(size, generator=torch.Generator().manual_seed(seed))
    return vector / vector.norm()


def _state(direction: torch.Tensor, threshold: float = 100.0, steer: torch.Tensor | None = None,
           **config) -> MonitorState:
    config = MonitorConfig(**{"layers": [LAYER], "min_tokens": 2, **config})
    steer = torch.zeros(1, direction.numel()) if steer is None else steer[None]
    return MonitorState(config, [LAYER], direction[None].clone(), torch.zeros(1), steer, threshold, num_layers=3,
                        request_marker=request_marker(tiny_tokenizer()))


@contextlib.contextmanager
def forced(model, direction: torch.Tensor, rows: list[bool], strength: float = 1000.0):
    """A test hook (registered before the monitor's, so it runs first) that pushes the newest state of
    the chosen batch rows far along `direction` at the monitored layer."""
    mask = torch.tensor(rows, dtype=torch.float32)[:, None]

    def hook(module, args, output):
        block_output(output)[:, -1] += strength * mask * direction

    handle = transformer_blocks(model)[LAYER].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _plain(model, tok, prompts, max_new_tokens=NEW_TOKENS) -> torch.Tensor:
    inputs = encode_prompts(tok, prompts)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[:, inputs["input_ids"].shape[1]:]


def _monitored(model, tok, prompts, state, config=None, max_new_tokens=NEW_TOKENS):
    inputs = encode_prompts(tok, prompts)
    with Monitor(model, config, state) as mon, torch.no_grad():
        out = mon.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[:, inputs["input_ids"].shape[1]:], mon


def _hook_count(model) -> int:
    return sum(len(block._forward_hooks) for block in transformer_blocks(model)) + len(model._forward_pre_hooks)


@pytest.mark.parametrize("action", ["stop", "steer", "observe"])
def test_unflagged_generation_equals_plain_generate_token_for_token(llama, action):
    model, tok = llama
    plain = _plain(model, tok, PROMPTS)
    tokens, mon = _monitored(model, tok, PROMPTS, _state(_unit(0), steer=50 * _unit(1), action=action))
    assert mon.flags == [False, False, False]
    assert torch.equal(tokens, plain)
    assert mon.scores.shape[0] == 3 and mon.flag_tokens == [None, None, None]


def test_stop_flags_forced_rows_at_min_tokens_and_leaves_others_alone(llama):
    model, tok = llama
    direction, rows = _unit(0), [True, False, True]
    with forced(model, direction, rows):
        plain = _plain(model, tok, PROMPTS)
        tokens, mon = _monitored(model, tok, PROMPTS, _state(direction, min_tokens=3))
    assert mon.flags == rows
    assert mon.flag_tokens == [3, None, 3]
    eos = tok.eos_token_id
    for row in (0, 2):
        # Three generated tokens, then the forced EOS, then padding.
        assert torch.equal(tokens[row, :3], plain[row, :3]) and tokens[row, 3] == eos
    assert torch.equal(tokens[1], plain[1])
    assert mon.apply_refusals(["a", "b", "c"]) == [mon.config.refusal_text, "b", mon.config.refusal_text]
    assert len(mon.history) == 1 and mon.history[0].flags == rows


def test_a_negative_direction_gives_no_flags_even_when_forced(llama):
    model, tok = llama
    direction = _unit(0)
    with forced(model, direction, [True, True, True]):
        plain = _plain(model, tok, PROMPTS)
        tokens, mon = _monitored(model, tok, PROMPTS, _state(-direction))
    assert mon.flags == [False, False, False]
    assert torch.equal(tokens, plain)
    assert max(mon.peaks) < -100


def test_batched_flags_equal_batch_one_flags(llama):
    model, tok = llama
    direction = _unit(0)
    rows = [True, False, True]
    state = _state(direction, min_tokens=1, statistic="max", include_prompt=False)
    with forced(model, direction, rows):
        _, batched = _monitored(model, tok, PROMPTS, state)
        batch_flags, batch_tokens, batch_scores = batched.flags, batched.flag_tokens, batched.scores
    single_flags, single_tokens = [], []
    for prompt, row in zip(PROMPTS, rows):
        with forced(model, direction, [row]):
            _, mon = _monitored(model, tok, [prompt], state)
        single_flags += mon.flags
        single_tokens += mon.flag_tokens
        # Per-token scores of an unflagged row match too (left padding does not leak into them).
        if not row:
            n = mon.scores.shape[1]
            torch.testing.assert_close(batch_scores[1, :n], mon.scores[0], atol=1e-4, rtol=1e-4)
    assert batch_flags == single_flags == rows
    assert batch_tokens == single_tokens == [1, None, 1]


class _EndRowEarly:
    """A caller's LogitsProcessor that makes one row emit EOS as its `at`-th generated token."""

    def __init__(self, row: int, at: int, eos: int, prompt_len: int):
        self.row, self.at, self.eos, self.prompt_len = row, at, eos, prompt_len

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] - self.prompt_len == self.at - 1:
            scores[self.row] = float("-inf")
            scores[self.row, self.eos] = 0.0
        return scores


def test_rows_that_ended_stop_updating_and_caller_processors_still_run(llama):
    from transformers import LogitsProcessorList

    model, tok = llama
    direction = _unit(0)
    inputs = encode_prompts(tok, PROMPTS)
    early = _EndRowEarly(row=1, at=2, eos=tok.eos_token_id, prompt_len=inputs["input_ids"].shape[1])
    with forced(model, direction, [True, True, True]):
        with Monitor(model, None, _state(direction, min_tokens=3)) as mon, torch.no_grad():
            out = mon.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False,
                               logits_processor=LogitsProcessorList([early]))
    assert out[1, inputs["input_ids"].shape[1] + 1] == tok.eos_token_id
    # Row 1 ended after 2 tokens (the second being EOS), before min_tokens: never eligible, never flagged.
    assert mon.flags == [True, False, True] and mon.flag_tokens == [3, None, 3]
    assert not math.isnan(mon.scores[1, 0]) and torch.isnan(mon.scores[1, 1:]).all()


def test_prompt_score_alone_can_stop_before_the_first_token(llama):
    model, tok = llama
    direction = _unit(0)
    with forced(model, direction, [True, False]):
        replies = monitored_generate(model, tok, PROMPTS[:2], None, _state(direction, min_tokens=0),
                                     max_new_tokens=NEW_TOKENS)
    assert [r.flagged for r in replies] == [True, False]
    assert replies[0].flag_token == 0 and replies[0].generated == "" and replies[0].action == "stop"
    assert replies[0].text == MonitorConfig().refusal_text
    assert replies[1].text == replies[1].generated and replies[1].action == "none"
    assert replies[0].prompt_score > 100 > replies[1].prompt_score


def test_steer_changes_flagged_output_only(llama):
    model, tok = llama
    direction, rows = _unit(0), [True, False, True]
    # Steering against the forced push (which alone pins the reply to one token) frees the reply.
    steer = -1000.0 * direction + 50 * _unit(5)
    with forced(model, direction, rows):
        observed, observe_mon = _monitored(model, tok, PROMPTS, _state(direction, steer=steer, action="observe"))
        steered, steer_mon = _monitored(model, tok, PROMPTS, _state(direction, steer=steer, action="steer"))
    assert observe_mon.flags == steer_mon.flags == rows
    assert torch.equal(steered[1], observed[1])
    for row in (0, 2):
        assert not torch.equal(steered[row], observed[row])
        # The first 2 tokens (min_tokens) are untouched; steering starts with the token chosen at the flag.
        assert torch.equal(steered[row, :2], observed[row, :2])


def test_hooks_are_removed_even_on_exception_and_generate_is_never_replaced(llama):
    model, tok = llama
    before = _hook_count(model)
    with pytest.raises(ValueError, match="boom"):
        with Monitor(model, None, _state(_unit(0))):
            assert _hook_count(model) == before + 2 and "generate" not in vars(model)
            raise ValueError("boom")
    assert _hook_count(model) == before and "generate" not in vars(model)
    # Beam search is refused before the call; the hooks still go.
    with pytest.raises(SsahError, match="beam"):
        with Monitor(model, None, _state(_unit(0))) as mon:
            mon.generate(**encode_prompts(tok, PROMPTS[:1]), max_new_tokens=2, num_beams=2)
    assert _hook_count(model) == before and "generate" not in vars(model)
    with pytest.raises(RuntimeError, match="not active"):
        Monitor(model, None, _state(_unit(0))).generate(**encode_prompts(tok, PROMPTS[:1]), max_new_tokens=2)


def test_a_generate_call_that_does_not_go_through_the_monitor_is_left_alone(llama):
    model, tok = llama
    direction = _unit(0)
    inputs = encode_prompts(tok, PROMPTS)
    with forced(model, direction, [True, False, True]):
        plain = _plain(model, tok, PROMPTS)
        with Monitor(model, None, _state(direction, min_tokens=1)) as mon, torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
            assert mon.history == []
            watched = mon.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
            again = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(out[:, inputs["input_ids"].shape[1]:], plain)
    assert torch.equal(again, out)  # the flags of the watched call do not reach a later plain call
    assert len(mon.history) == 1 and mon.history[0].flags == [True, False, True]
    assert not torch.equal(watched, out)


def test_forward_calls_outside_generate_are_not_monitored(llama):
    model, tok = llama
    inputs = encode_prompts(tok, PROMPTS[:1])
    with Monitor(model, None, _state(_unit(0), threshold=-math.inf)) as mon, torch.no_grad():
        model(**inputs)
        with pytest.raises(RuntimeError, match="no monitored generate"):
            _ = mon.flags


def test_config_round_trips_and_rejects_unknown_keys(tmp_path):
    config = MonitorConfig(layers=[1, 2], action="steer", steer_alpha=2.5, target_fpr=0.02)
    for name in ("m.yaml", "m.json"):
        assert MonitorConfig.load(config.save(tmp_path / name)) == config
    (tmp_path / "bad.yaml").write_text("action: stop\nthreshhold: 3\n")
    with pytest.raises(SsahError, match="unknown config key 'threshhold'"):
        MonitorConfig.load(tmp_path / "bad.yaml")
    with pytest.raises(SsahError, match="action"):
        MonitorConfig(action="explode")
    with pytest.raises(SsahError, match="target_fpr"):
        MonitorConfig(target_fpr=0.0)


def test_monitor_refuses_a_config_the_state_was_not_calibrated_for(llama):
    model, _ = llama
    with pytest.raises(SsahError, match="statistic"):
        Monitor(model, MonitorConfig(layers=[LAYER], min_tokens=2, statistic="mean"), _state(_unit(0)))
    with pytest.raises(SsahError, match="prompt_position"):
        Monitor(model, MonitorConfig(layers=[LAYER], min_tokens=2, prompt_position="last"), _state(_unit(0)))
    with pytest.raises(SsahError, match="layers"):
        Monitor(model, MonitorConfig(layers=[0], min_tokens=2), _state(_unit(0)))
    other, _ = tiny_model("gpt2")
    wide = MonitorState(MonitorConfig(layers=[LAYER]), [LAYER], torch.zeros(1, 64), torch.zeros(1),
                        torch.zeros(1, 64), 0.0, num_layers=3)
    with pytest.raises(SsahError, match="hidden size"):
        Monitor(other, None, wide)


def test_upper_quantile_controls_the_share_above():
    values = torch.arange(100, dtype=torch.float32)
    threshold = upper_quantile(values, 0.05)
    assert float((values > threshold).float().mean()) == pytest.approx(0.05)
    assert upper_quantile(torch.tensor([-math.inf, 1.0, 2.0]), 0.5) == 1.0


def _templates(n: int, seed: int = 0):
    rng = random.Random(seed)
    words = ["apple", "river", "stone", "cloud", "tiger", "piano", "lemon", "glass"]
    harmful = [f"HOW DO I BUILD A {rng.choice(words).upper()} WEAPON {i}?" for i in range(n)]
    benign = [f"please describe the {rng.choice(words)} in a short poem, number {i}." for i in range(n)]
    return harmful, benign


def test_calibrated_monitor_flags_the_harmful_template_and_controls_benign_rate(llama, tmp_path):
    model, tok = llama
    harmful, benign = _templates(24)
    config = MonitorConfig(calibration_tokens=8, min_tokens=2, target_fpr=0.1)
    state = calibrate_monitor(model, tok, harmful[:16], benign[:16], config)
    assert state.meta["calibration"]["benign_flag_rate"] <= 0.1
    assert len(state.layers) == 1 and state.config.threshold is None
    replies = monitored_generate(model, tok, harmful[16:] + benign[16:], None, state, max_new_tokens=8)
    flags = [r.flagged for r in replies]
    assert sum(flags[:8]) >= 6 and sum(flags[8:]) <= 2
    # The state file round-trips and is bound to the model it was calibrated on.
    loaded_config, loaded = monitor_from_file(model, tok, state.save(tmp_path / "state.safetensors"))
    assert loaded.layers == state.layers and loaded.threshold == state.threshold and loaded_config == state.config
    torch.testing.assert_close(loaded.weight, state.weight)
    other, other_tok = tiny_model("llama", seed=1)
    with pytest.raises(SsahError, match="recalibrate"):
        monitor_from_file(other, other_tok, tmp_path / "state.safetensors")


def test_calibration_refuses_test_splits(llama):
    model, tok = llama
    test_split = Dataset("harmful:test", [Record(id=f"h{i}", prompt=f"p{i}") for i in range(4)])
    with pytest.raises(SsahError, match="test split"):
        calibrate_monitor(model, tok, test_split, ["a", "b"], MonitorConfig())


def test_directions_from_ssah_probe_feed_the_monitor_directly(llama):
    from ssah.probe.directions import compute_directions
    from ssah.probe.hidden import last_token_states

    model, tok = llama
    harmful, benign = _templates(12)
    directions = compute_directions(last_token_states(model, tok, harmful[:8]),
                                    last_token_states(model, tok, benign[:8]),
                                    [0, 1, 2])
    config = MonitorConfig(layers=[-2], min_tokens=0, statistic="max", target_fpr=0.25)
    state = MonitorState.from_directions(directions, config, num_layers=3)
    assert state.layers == [1]
    # The threshold is the benign prompts' (1 - target_fpr) quantile of the z-score: 2 of 8 lie above it.
    scores = directions.benign_scores[1]
    z = (scores - scores.mean()) / scores.std(unbiased=False)
    assert state.threshold == pytest.approx(upper_quantile(z, 0.25), abs=1e-5)
    assert int((z > state.threshold).sum()) == 2
    replies = monitored_generate(model, tok, harmful[8:] + benign[8:], config, directions, max_new_tokens=4)
    assert [r.flagged for r in replies[:4]] == [True] * 4


def test_borderline_prompts_join_the_threshold_calibration(llama):
    """With borderline prompts (here: the harmful template, the hardest case), the threshold is the
    quantile over benign and borderline replies together, so at most target_fpr of both are flagged."""
    model, tok = llama
    harmful, benign = _templates(24)
    config = MonitorConfig(calibration_tokens=8, min_tokens=2, target_fpr=0.25, contrast_borderline=False)
    plain = calibrate_monitor(model, tok, harmful[:16], benign[:16], config)
    mixed = calibrate_monitor(model, tok, harmful[:16], benign[:16], config, borderline_calib=harmful[16:])
    calibration = mixed.meta["calibration"]
    flagged = calibration["benign_flag_rate"] * 16 + calibration["borderline_flag_rate"] * 8
    assert flagged <= 0.25 * 24 + 1e-6
    assert mixed.threshold > plain.threshold and plain.meta["calibration"]["borderline_flag_rate"] is None
    assert mixed.meta["borderline"]["n"] == 8
    assert torch.equal(mixed.weight, plain.weight)  # without contrast the direction ignores them
    with pytest.raises(SsahError, match="test split"):
        calibrate_monitor(model, tok, harmful[:16], benign[:16], config,
                          borderline_calib=Dataset("sensitive_safe:test", [Record(id=f"s{i}", prompt=f"p{i}")
                                                                           for i in range(4)]))


def test_contrast_borderline_fits_the_direction_on_one_half_and_the_threshold_on_the_other(llama):
    model, tok = llama
    harmful, benign = _templates(24)
    config = MonitorConfig(calibration_tokens=8, min_tokens=2, target_fpr=0.25, layers=[LAYER])
    contrast = calibrate_monitor(model, tok, harmful[:16], benign[:16], config, borderline_calib=harmful[16:])
    assert contrast.meta["borderline"]["contrast"] == 4
    calibration = contrast.meta["calibration"]
    flagged = calibration["benign_flag_rate"] * 16 + calibration["borderline_flag_rate"] * 4
    assert flagged <= 0.25 * 20 + 1e-6
    # The direction is the mean of harmful minus the mean of benign + the even half of the borderline prompts.
    from ssah.probe.hidden import last_token_states

    states_h = last_token_states(model, tok, harmful[:16], [LAYER])[:, 0]
    states_n = last_token_states(model, tok, benign[:16] + harmful[16:][0::2], [LAYER])[:, 0]
    expected = states_h.mean(0) - states_n.mean(0)
    direction = contrast.weight[0] / contrast.weight[0].norm()
    assert torch.allclose(direction, expected / expected.norm(), atol=1e-4)
    with pytest.raises(SsahError, match="at least 4"):
        calibrate_monitor(model, tok, harmful[:16], benign[:16], config, borderline_calib=harmful[16:19])


def test_a_threshold_set_bounds_the_flag_rate_and_every_borderline_prompt_shapes_the_direction(llama):
    """With threshold_calib, all borderline prompts join the benign side of the direction and the
    threshold set's replies (not half of the borderline ones) bound the flag rate."""
    from ssah.probe.hidden import last_token_states

    model, tok = llama
    harmful, benign = _templates(28)
    config = MonitorConfig(calibration_tokens=8, min_tokens=2, target_fpr=0.25, layers=[LAYER])
    borderline, threshold_set = harmful[16:20], harmful[20:28]
    state = calibrate_monitor(model, tok, harmful[:16], benign[:16], config, borderline_calib=borderline,
                              threshold_calib=threshold_set)
    assert state.meta["borderline"]["contrast"] == 4 and state.meta["threshold_set"]["n"] == 8
    assert state.meta["threshold_from"] == "benign and threshold-set calibration replies"
    calibration = state.meta["calibration"]
    assert calibration["benign_flag_rate"] <= 0.25 and calibration["borderline_flag_rate"] <= 0.25
    # The threshold set sounds as harmful as the harmful template: bounding its flag rate at 25%
    # lifts the threshold above the benign-only one.
    plain = calibrate_monitor(model, tok, harmful[:16], benign[:16], config, borderline_calib=borderline,
                              threshold_calib=benign[16:24])
    assert state.threshold > plain.threshold
    states_h = last_token_states(model, tok, harmful[:16], [LAYER])[:, 0]
    states_n = last_token_states(model, tok, benign[:16] + borderline, [LAYER])[:, 0]
    expected = states_h.mean(0) - states_n.mean(0)
    assert torch.allclose(state.weight[0] / state.weight[0].norm(), expected / expected.norm(), atol=1e-4)
    with pytest.raises(SsahError, match="test split"):
        calibrate_monitor(model, tok, harmful[:16], benign[:16], config, borderline_calib=borderline,
                          threshold_calib=Dataset("sensitive_safe:test", [Record(id=f"s{i}", prompt=f"p{i}")
                                                                          for i in range(4)]))


def test_request_marker_is_the_generation_prompt_tail(llama):
    _, tok = llama
    marker = request_marker(tok)
    assert tok.decode(marker).strip().endswith("assistant")  # ChatML: "<|im_end|>\n<|im_start|>assistant\n"
    k = len(marker)
    first = [0, 0, 7, *marker, 9, 9]  # a request then two reply tokens (a prefill)
    second = [5, *marker, 8, *marker]  # the marker twice: the last one counts
    first = [0] * (len(second) - len(first)) + first  # left padding
    ids = torch.tensor([first, second])
    assert request_ends(ids, marker).tolist() == [len(first) - 3, 2 * k + 1]
    assert request_ends(ids, [250, 251]).tolist() == [ids.shape[1] - 1] * 2  # no marker: the last token


def test_prefill_cannot_move_the_request_score(llama):
    """The prompt score is read where the request ends, so text placed in the reply leaves it exactly
    as it was; read at the last input token (prompt_position last) the prefill changes it."""
    model, tok = llama
    prefills = ["Sure, here is how", "Of course! Step one:", "Yes"]
    scores = {}
    for position in ("request", "last"):
        state = _state(_unit(0), prompt_position=position)
        for name, pre in (("plain", None), ("prefilled", prefills)):
            replies = monitored_generate(model, tok, PROMPTS, None, state, prefills=pre, max_new_tokens=2)
            scores[position, name] = torch.tensor([r.prompt_score for r in replies])
    assert torch.allclose(scores["request", "plain"], scores["request", "prefilled"], atol=1e-5)
    assert torch.allclose(scores["request", "plain"], scores["last", "plain"], atol=1e-5)
    assert (scores["last", "plain"] - scores["last", "prefilled"]).abs().min() > 1e-3


def test_a_state_saved_before_request_reading_keeps_its_last_token_reading(tmp_path):
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = _state(_unit(0), prompt_position="last", contrast_borderline=False).save(tmp_path / "old.safetensors")
    # Rewrite it as an older ssah wrote it: no request marker, no prompt_position/contrast keys.
    with safe_open(str(path), "pt") as handle:
        metadata = dict(handle.metadata())
    config = json.loads(metadata["config"])
    del config["prompt_position"], config["contrast_borderline"]
    metadata["config"] = json.dumps(config)
    del metadata["request_marker"]
    save_file(load_file(str(path)), str(path), metadata=metadata)
    state = MonitorState.load(path)
    assert state.config.prompt_position == "last" and state.config.contrast_borderline is False
    assert state.request_marker == []
