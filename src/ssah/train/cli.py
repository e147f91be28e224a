"""`ssah finetune` and `ssah align`: supervised fine-tuning with frozen units, LoRA, or a unit budget."""

from __future__ import annotations

import random

import click

from ssah.cli_common import load_from_options, model_options


def train_options(func):
    """The hyper-parameters shared by finetune and align (see ssah.train.sft.TrainConfig)."""
    options = [
        click.option("--lr", type=float, default=None, help="learning rate [finetune 2e-5, align 1e-4]"),
        click.option("--epochs", type=float, default=1.0, show_default=True),
        click.option("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)"),
        click.option("--batch-size", type=int, default=8, show_default=True),
        click.option("--grad-accum", type=int, default=1, show_default=True),
        click.option("--max-length", type=int, default=256, show_default=True),
        click.option("--weight-decay", type=float, default=0.0, show_default=True),
        click.option("--warmup", type=float, default=0.0, show_default=True, help="share of steps warming up"),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--bf16", is_flag=True, help="bf16 autocast"),
        click.option("--limit", type=int, default=None, help="use only the first N examples"),
        click.option("--out", required=True, type=click.Path(), help="output model folder"),
        click.option("--force", is_flag=True, help="overwrite an output folder made from other inputs"),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _config(default_lr: float, **kw):
    from ssah.train.sft import TrainConfig

    return TrainConfig(lr=kw["lr"] or default_lr, epochs=kw["epochs"], max_steps=kw["max_steps"],
                       batch_size=kw["batch_size"], grad_accum=kw["grad_accum"], max_length=kw["max_length"],
                       weight_decay=kw["weight_decay"], warmup=kw["warmup"], seed=kw["seed"], bf16=kw["bf16"])


def _save(loaded, model, out: str, record: dict) -> None:
    from ssah.io import atomic_dir, write_json_atomic

    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        write_json_atomic(tmp / "train.json", record)
    _plot_loss(record["result"]["loss_curve"], f"{out}/loss.png")


def _plot_loss(curve: list[float], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ssah.io import save_png

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(range(1, len(curve) + 1), curve)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (response tokens)")
    fig.tight_layout()
    save_png(fig, path, dpi=100)
    plt.close(fig)


@click.command("finetune")
@model_options
@click.option("--data", "data_spec", required=True, help="(prompt, response) data, e.g. benign:train or alpaca:FILE")
@click.option("--freeze", "freeze_spec", default=None, help="GROUPS_DIR:MASK units to keep bit-identical, e.g. g:SCU+CU")
@click.option("--frozen-epochs-multiplier", type=float, default=2.0, show_default=True,
              help="frozen runs train this many times longer (the paper doubles them)")
@click.option("--lora", is_flag=True, help="train LoRA adapters (r=8) instead of full weights; merged on save")
@train_options
def finetune(model_args: dict, data_spec: str, freeze_spec: str | None, frozen_epochs_multiplier: float,
             lora: bool, **kw) -> None:
    """Supervised fine-tuning (loss on response tokens), optionally with frozen units or LoRA."""
    from ssah.data import load_dataset
    from ssah.errors import SsahError
    from ssah.interventions.freeze import UnitFreezer
    from ssah.interventions.masks import load_mask, split_mask_spec
    from ssah.io import existing_run
    from ssah.train.lora import apply_lora, merge_lora
    from ssah.train.sft import train_sft

    if freeze_spec and lora:
        raise SsahError("--freeze and --lora cannot be combined: LoRA leaves every base weight frozen already")
    config = _config(2e-5, **kw)
    if freeze_spec:
        config.epochs *= frozen_epochs_multiplier
        config.max_steps = config.max_steps and round(config.max_steps * frozen_epochs_multiplier)
    data = load_dataset(data_spec)
    if kw["limit"]:
        data = data.take(kw["limit"])
    loaded = load_from_options(model_args)
    mask = None
    if freeze_spec:
        mask = load_mask(*split_mask_spec(freeze_spec), seed=kw["seed"])
        mask.check_model(loaded.fingerprint, loaded.layout)
    identity = {"model_fingerprint": loaded.fingerprint, "data_fingerprint": data.fingerprint,
                "freeze": freeze_spec and mask.groups_digest + ":" + mask.expression, "lora": lora,
                "config": config.to_dict()}
    if existing_run(kw["out"], "train.json", identity, kw["force"]):
        click.echo(f"{kw['out']} already holds this fine-tuned model; nothing to do")
        return
    model, freezer = loaded.model, None
    if mask is not None:
        freezer = UnitFreezer(model, loaded.layout, mask)
    if lora:
        model = apply_lora(model)
    pairs = [(r.prompt, r.response) for r in data]
    result = train_sft(model, loaded.tokenizer, pairs, config, freezer=freezer)
    if lora:
        model = merge_lora(model)
    record = {"identity": identity, "kind": "finetune", "data": data.name, "source_model": loaded.spec,
              "frozen_units": mask.count() if mask else 0, "result": result.to_dict()}
    _save(loaded, model, kw["out"], record)
    _echo_result(kw["out"], result)


def _lengths(text: str) -> list[int]:
    from ssah.errors import SsahError

    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SsahError(f"--recovery takes token counts like 2,4,6,8,10, got {text!r}") from None
    if not values or min(values) < 1:
        raise SsahError(f"--recovery takes positive token counts like 2,4,6,8,10, got {text!r}")
    return values


def _echo_result(out: str, result) -> None:
    check = result.check
    frozen = (f", frozen entries max change {check['max_abs_change_frozen']:g}"
              if "max_abs_change_frozen" in check else "")
    click.echo(f"{result.steps} steps in {result.seconds:.0f}s, final loss {result.final_loss:.4f}{frozen}; saved {out}")


def refusal_texts(refusals) -> list[str]:
    """The reply text of each record of a refusals dataset (its response, else its prompt field)."""
    return [r.response or r.prompt for r in refusals]


def refusals_to_avoid(borderline: list[tuple[str, str]], refusals) -> dict[str, list[str]]:
    """Every refusal as an opening to avoid in the reply to each borderline prompt (`train_sft(avoid=...)`)."""
    texts = refusal_texts(refusals)
    return {prompt: texts for prompt, _ in borderline}


def alignment_pairs(harmful, benign, refusals, seed: int = 0,
                    borderline: list[tuple[str, str]] = ()) -> list[tuple[str, str]]:
    """Harmful prompts paired with built-in refusals, mixed with benign (prompt, answer) pairs.

    Refusals are assigned round-robin over a seeded shuffle, so every reserved option is used.
    `borderline` pairs (safe prompts that sound unsafe, answered) teach the model where refusing stops.
    """
    rng = random.Random(seed)
    replies = refusal_texts(refusals)
    rng.shuffle(replies)
    pairs = [(r.prompt, replies[i % len(replies)]) for i, r in enumerate(harmful)]
    pairs += [(r.prompt, r.response) for r in benign if r.response]
    pairs += list(borderline)
    rng.shuffle(pairs)
    return pairs


def recovery_examples(tokenizer, prompts: list[str], replies: list[str], refusals, lengths=(2, 4, 6, 8, 10),
                      seed: int = 0) -> list[tuple[str, str, str]]:
    """Deeper-alignment data: (harmful prompt, refusal, first k tokens of a compliant reply).

    Trained with the compliant start as a prefill (no loss on it), they teach the model to turn back
    to a refusal after it has begun to comply, the failure a prefill attack exploits. k cycles over
    `lengths`; replies that open with a refusal (prefix rule) or are shorter than k tokens are skipped.
    `replies` are the model's own greedy answers (an unaligned model complies), so no harmful text
    is written by us.
    """
    from ssah.errors import SsahError
    from ssah.evaluate.rules import is_refusal

    if not lengths or min(lengths) < 1:
        raise SsahError(f"recovery lengths must be positive token counts, got {list(lengths)}")
    rng = random.Random(seed + 1)
    texts = refusal_texts(refusals)
    out = []
    for i, (prompt, reply) in enumerate(zip(prompts, replies)):
        k = lengths[i % len(lengths)]
        ids = tokenizer(reply, add_special_tokens=False)["input_ids"]
        if is_refusal(reply) or len(ids) < k:
            continue
        out.append((prompt, rng.choice(texts), tokenizer.decode(ids[:k]).strip()))
    return out


@click.command("align")
@model_options
@click.option("--budget", "budget_spec", required=True,
              help="GROUPS_DIR:MASK units allowed to train (e.g. g:RU), or 'all' for full-parameter alignment")
@click.option("--data", "data_spec", default="harmful:train", show_default=True, help="harmful prompts to refuse")
@click.option("--benign", "benign_spec", default="benign:train", show_default=True,
              help="benign (prompt, answer) pairs mixed in so the model does not refuse everything")
@click.option("--refusals", "refusals_spec", default="refusals", show_default=True, help="refusal replies")
@click.option("--recovery", "recovery_lengths", default=None, metavar="K1,K2,...",
              help="deeper alignment: also train a refusal after the first K tokens of the model's own compliant "
              "reply to each harmful prompt (K cycles over the list, e.g. 2,4,6,8,10)")
@click.option("--borderline", "borderline_spec", default=None, metavar="DATA",
              help="safe prompts that sound unsafe (e.g. sensitive_safe:train), trained on the model's own answers "
              "so it learns where refusing stops")
@click.option("--borderline-tokens", type=int, default=48, show_default=True,
              help="length of the model's own answers to --borderline prompts")
@click.option("--avoid-refusals", type=float, default=0.0, show_default=True, metavar="WEIGHT",
              help="with --borderline: weight of a loss that makes a refusal's opening unlikely at the start of "
              "each borderline reply (0: off)")
@train_options
def align(model_args: dict, budget_spec: str, data_spec: str, benign_spec: str, refusals_spec: str,
          recovery_lengths: str | None, borderline_spec: str | None, borderline_tokens: int, avoid_refusals: float,
          **kw) -> None:
    """Safety alignment SFT that trains only a unit budget; everything else stays bit-identical."""
    from ssah.data import load_dataset
    from ssah.errors import SsahError
    from ssah.evaluate import generate_replies
    from ssah.interventions.freeze import UnitFreezer
    from ssah.interventions.masks import load_mask, split_mask_spec
    from ssah.io import existing_run
    from ssah.train.sft import train_sft

    if avoid_refusals < 0:
        raise SsahError(f"--avoid-refusals is a loss weight and must be >= 0, got {avoid_refusals}")
    if avoid_refusals and not borderline_spec:
        raise SsahError("--avoid-refusals needs --borderline: it acts on the replies to borderline prompts")
    config = _config(1e-4, **kw)
    config.avoid_weight = avoid_refusals
    lengths = _lengths(recovery_lengths) if recovery_lengths else None
    harmful, benign, refusals = (load_dataset(s) for s in (data_spec, benign_spec, refusals_spec))
    borderline_data = load_dataset(borderline_spec) if borderline_spec else None
    if kw["limit"]:
        harmful, benign = harmful.take(kw["limit"]), benign.take(kw["limit"])
        if borderline_data is not None:
            borderline_data = borderline_data.take(kw["limit"])
    loaded = load_from_options(model_args)
    mask = None
    if budget_spec != "all":
        mask = load_mask(*split_mask_spec(budget_spec), seed=kw["seed"])
        mask.check_model(loaded.fingerprint, loaded.layout)
    identity = {"model_fingerprint": loaded.fingerprint, "harmful": harmful.fingerprint,
                "benign": benign.fingerprint, "refusals": refusals.fingerprint,
                "budget": mask.groups_digest + ":" + mask.expression if mask else "all", "config": config.to_dict(),
                "recovery": lengths, "borderline": borderline_data.fingerprint if borderline_data is not None else None,
                "borderline_tokens": borderline_tokens if borderline_data is not None else None}
    if existing_run(kw["out"], "train.json", identity, kw["force"]):
        click.echo(f"{kw['out']} already holds this aligned model; nothing to do")
        return
    freezer = UnitFreezer(loaded.model, loaded.layout, mask, train_only=True) if mask else None
    borderline: list[tuple[str, str]] = []
    if borderline_data is not None:
        prompts = borderline_data.prompts()
        replies = generate_replies(loaded.model, loaded.tokenizer, prompts, model_key=loaded.fingerprint,
                                   max_new_tokens=borderline_tokens, batch_size=kw["batch_size"])
        borderline = [(p, r) for p, r in zip(prompts, replies) if r.strip()]
        click.echo(f"{len(borderline)} borderline prompts answered by the model itself")
    pairs = alignment_pairs(harmful, benign, refusals, seed=config.seed, borderline=borderline)
    if lengths:
        prompts = harmful.prompts()
        replies = generate_replies(loaded.model, loaded.tokenizer, prompts, model_key=loaded.fingerprint,
                                   max_new_tokens=max(lengths) + 8, batch_size=kw["batch_size"])
        recovery = recovery_examples(loaded.tokenizer, prompts, replies, refusals, lengths, seed=config.seed)
        click.echo(f"{len(recovery)} recovery examples (of {len(prompts)} harmful prompts; the others were refused "
                   "or too short)")
        pairs = pairs + recovery
        random.Random(config.seed).shuffle(pairs)
    avoid = refusals_to_avoid(borderline, refusals) if avoid_refusals else None
    result = train_sft(loaded.model, loaded.tokenizer, pairs, config, freezer=freezer, avoid=avoid)
    record = {"identity": identity, "kind": "align", "source_model": loaded.spec,
              "budget_units": mask.count() if mask else loaded.layout.total_units,
              "budget_share": mask.share() if mask else 1.0, "result": result.to_dict()}
    _save(loaded, loaded.model, kw["out"], record)
    _echo_result(kw["out"], result)
