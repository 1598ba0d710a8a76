"""`lmstack triage train`: LoRA SFT of the bundled model on the training split, on a CPU.

Reproducible: a fixed seed picks a category-stratified sample of the Bitext *training* split
(plus our own training tickets, repeated so Technical is not drowned out), augments some
with e-mails/customer IDs/products, and trains LoRA (all linear layers) for one pass with
a plain torch loop under bf16 autocast. Loss is on the answer tokens only. The prompt is
the same zero-shot prompt `lmstack triage` sends with the adapter, byte for byte.

Every prompt starts with the same ~290 tokens (system rules, the start of the user turn).
Each step runs that shared prefix once, without gradient, under the current weights, and
trains the batch's suffixes on top of its KV cache: the forward pass is exact, only the
gradient through the prefix is dropped, and a step costs about a third of full sequences.

The adapter is written as bf16 safetensors plus adapter.json (rank, alpha, modules, the
training record); `adapter.py` merges it into the base weights on load.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

from lmstack.triage.dataset import LabelledTicket, augment, load_bitext, load_own_tickets
from lmstack.triage.dataset import split_of_ticket as split_of
from lmstack.triage.languages import detect_language
from lmstack.triage.prompt import build_messages
from lmstack.triage.schema import Entities, TriageOutput

HEADER_WEIGHT = 4.0  # category, urgency, entities and key_issue count this much more
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class TrainConfig:
    train_size: int = 320  # Bitext training tickets (stratified by category)
    own_repeats: int = 3  # each own training ticket this many times
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.05
    lr: float = 8e-4
    batch_size: int = 8
    epochs: int = 1
    seed: int = 0
    threads: int | None = None


def target_json(ticket: LabelledTicket) -> str:
    """The answer the model should write, exactly as constrained decoding would emit it."""
    output = TriageOutput(
        category=ticket.category,
        urgency=ticket.urgency or "Medium",
        entities=Entities(
            **{k: v for k, v in ticket.entities.items() if k in Entities.model_fields}
        ),
        key_issue=ticket.key_issue or "",
        suggested_response=ticket.reply or "",
    )
    return output.model_dump_json()


def training_tickets(config: TrainConfig) -> list[LabelledTicket]:
    rng = random.Random(config.seed)
    by_category: dict[str, list[LabelledTicket]] = defaultdict(list)
    for ticket in load_bitext():
        if split_of(ticket) == "train":
            by_category[ticket.category].append(ticket)
    per_category = config.train_size // len(by_category)
    chosen = []
    for category in sorted(by_category):
        pool = by_category[category]
        chosen += rng.sample(pool, min(per_category, len(pool)))
    chosen = [augment(t, rng) for t in chosen]
    own = [t for t in load_own_tickets() if split_of(t) == "train"]
    chosen += own * config.own_repeats
    rng.shuffle(chosen)
    return chosen


def encode(tokenizer, ticket: LabelledTicket) -> tuple[list[int], list[float]]:
    """(input ids, per-token loss weights): 0 on the prompt, HEADER_WEIGHT on the decisions
    (category ... key_issue), 1 on the reply. The reply is most of the answer's tokens but
    the least of its value; unweighted, it drowns out the one token that is the category.
    """
    language = detect_language(ticket.text)
    messages = build_messages(ticket.text, [], None if language == "English" else language)
    prompt = tokenizer.encode(tokenizer.apply_chat_template(messages))
    target = target_json(ticket)
    answer = tokenizer.encode(target + "<|im_end|>")
    header = len(tokenizer.encode(target[: target.index(',"suggested_response"')]))
    weights = [HEADER_WEIGHT] * header + [1.0] * (len(answer) - header)
    return prompt + answer, [0.0] * len(prompt) + weights


def train(out_dir: Path, config: TrainConfig, progress=None) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from lmstack.models import model_dir
    from lmstack.models import tokenizer as load_tokenizer

    random.seed(config.seed)
    torch.manual_seed(config.seed)
    if config.threads:
        torch.set_num_threads(config.threads)
    base_dir = model_dir("bundled")
    tokenizer = load_tokenizer(base_dir)
    tickets = training_tickets(config)
    encoded = [encode(tokenizer, t) for t in tickets]

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=TARGET_MODULES,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)

    prefix = shared_prefix([x for x, _ in encoded])
    cut = len(prefix)
    encoded = [(x[cut:], y[cut:]) for x, y in encoded]
    prefix_ids = torch.tensor([prefix])

    # Batches of similar length (less padding), in a seeded random order.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    batches = [order[i : i + config.batch_size] for i in range(0, len(order), config.batch_size)]
    steps = len(batches) * config.epochs
    warmup = max(1, steps // 10)

    def lr_at(step: int) -> float:
        if step < warmup:
            return config.lr * (step + 1) / warmup
        return config.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    pad = tokenizer.pad_token_id
    losses, started, step = [], time.monotonic(), 0
    rng = random.Random(config.seed)
    for _ in range(config.epochs):
        rng.shuffle(batches)
        for batch in batches:
            width = max(len(encoded[i][0]) for i in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            weights = torch.zeros((len(batch), width))
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                x, y = encoded[i]
                ids[row, : len(x)] = torch.tensor(x)
                weights[row, : len(y)] = torch.tensor(y)
                mask[row, : len(x)] = 1
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                with torch.no_grad():
                    cache = model(input_ids=prefix_ids, use_cache=True).past_key_values
                cache.batch_repeat_interleave(len(batch))
                full_mask = torch.cat([torch.ones((len(batch), cut), dtype=torch.long), mask], 1)
                logits = model(
                    input_ids=ids, attention_mask=full_mask, past_key_values=cache
                ).logits
            # Position t predicts token t+1; weight each prediction by its target's weight.
            losses_t = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                ids[:, 1:].reshape(-1),
                reduction="none",
            )
            w = weights[:, 1:].reshape(-1)
            loss = (losses_t * w).sum() / w.sum()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            losses.append(loss.item())
            if progress:
                progress(step, steps, losses[-1])

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(model)
    tensors = {
        _base_name(name): tensor.detach().to(torch.bfloat16).contiguous()
        for name, tensor in state.items()
    }
    save_file(tensors, str(out_dir / "adapter.safetensors"))
    record = {
        "base": "bundled",
        "rank": config.rank,
        "alpha": config.alpha,
        "target_modules": TARGET_MODULES,
        "few_shot": False,  # trained zero-shot: the prompt carries no examples by default
        "config": asdict(config),
        "examples": len(encoded),
        "shared_prefix_tokens": cut,
        "suffix_tokens": sum(len(x) for x, _ in encoded),
        "steps": steps,
        "header_weight": HEADER_WEIGHT,
        "loss_first": round(sum(losses[:5]) / min(5, len(losses)), 4),
        "loss_last": round(sum(losses[-5:]) / min(5, len(losses)), 4),
        "train_s": round(time.monotonic() - started, 1),
    }
    (out_dir / "adapter.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def shared_prefix(sequences: list[list[int]]) -> list[int]:
    """The longest common token prefix, leaving every sequence at least two tokens."""
    first = sequences[0]
    n = min(len(s) for s in sequences) - 2
    for seq in sequences[1:]:
        k = 0
        while k < n and seq[k] == first[k]:
            k += 1
        n = k
    return first[:n]


def _base_name(peft_name: str) -> str:
    """'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' -> 'model.layers...'"""
    return peft_name.removeprefix("base_model.model.")
