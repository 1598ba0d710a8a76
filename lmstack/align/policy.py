"""The policy side of PPO and DPO: loading and saving a policy, sampling rollouts from it,
and the forward pass that gives the log-probs, entropy and values PPO needs.

Sampling uses the in-training model's `generate`, not the serving engine: the engine would
need the new weights after every update, and the log-probs come from a torch forward pass
of the policy anyway. At scale the rollouts go to vLLM with a weight sync; nothing else
changes.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from lmstack.align.data import PromptItem
from lmstack.align.reward import PAD_TOKEN, TOKENIZER_FILES


@dataclass
class Rollout:
    """One batch of prompts and sampled replies, as tensors ready for forward passes."""

    input_ids: object  # [B, P + T]: left-padded prompt, right-padded reply
    attention_mask: object
    prompt_len: int
    reply_mask: object  # [B, T] float, 1 for reply tokens up to and including EOS
    texts: list[str]
    items: list[PromptItem]


class PolicyRunner:
    """Tokenizing, sampling (T = `temperature`, no top-k/top-p, so the sampling distribution
    is the policy's own and the log-probs are exact at T = 1) and forward passes."""

    def __init__(
        self,
        tokenizer,
        device,
        max_prompt_tokens: int,
        max_new_tokens: int,
        temperature: float = 1.0,
    ):
        self.tokenizer = tokenizer
        self.device = device
        self.max_prompt_tokens = max_prompt_tokens
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.pad_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
        self.eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")

    def prompt_ids(self, item: PromptItem) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            item.messages, tokenize=False, add_generation_prompt=True
        )
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids[-self.max_prompt_tokens :]

    def sample(self, model, items: list[PromptItem], seed: int, autocast) -> Rollout:
        import torch

        prompts = [self.prompt_ids(it) for it in items]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(prompts):
            ids[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        torch.manual_seed(seed)
        with torch.no_grad(), autocast():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=True,
                temperature=self.temperature,
                top_k=0,
                top_p=1.0,
                max_new_tokens=self.max_new_tokens,
                eos_token_id=self.eos_id,
                pad_token_id=self.pad_id,
            )
        reply = out[:, width:]
        is_eos = reply == self.eos_id
        # Tokens up to and including the first EOS belong to the reply.
        after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
        reply_mask = (~after_eos).long()
        reply = torch.where(reply_mask.bool(), reply, torch.full_like(reply, self.pad_id))
        texts = [
            self.tokenizer.decode(r[m.bool()].tolist(), skip_special_tokens=True).strip()
            for r, m in zip(reply, reply_mask)
        ]
        return Rollout(
            torch.cat([ids, reply], dim=1),
            torch.cat([mask, reply_mask], dim=1),
            width,
            reply_mask.float(),
            texts,
            items,
        )

    @staticmethod
    def forward(model, rollout: Rollout, rows=None, value_head=None):
        """(log-probs, entropy, values) of the reply tokens: each [B, T]."""
        import torch

        ids = rollout.input_ids if rows is None else rollout.input_ids[rows]
        mask = rollout.attention_mask if rows is None else rollout.attention_mask[rows]
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        hidden = model.model(input_ids=ids, attention_mask=mask, position_ids=positions)
        hidden = hidden.last_hidden_state[:, rollout.prompt_len - 1 : -1]
        logits = model.lm_head(hidden).float()
        logp_all = torch.log_softmax(logits, dim=-1)
        targets = ids[:, rollout.prompt_len :]
        logprobs = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        entropy = -(logp_all.exp() * logp_all).sum(-1)
        values = value_head(hidden.float()).squeeze(-1) if value_head is not None else None
        return logprobs, entropy, values


def load_policy(policy: str | Path, dtype=None):
    """(model, tokenizer, base directory) of an HF policy directory or 'bundled'."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmstack.models import model_dir

    base = model_dir(None if str(policy) == "bundled" else policy)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype or torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    return model, tokenizer, base


def save_policy(model, base: Path, out_dir: Path) -> None:
    """A plain HF directory `lmstack serve --model DIR` serves: weights, config, tokenizer."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (base / name).is_file():
            shutil.copy2(base / name, out_dir / name)
