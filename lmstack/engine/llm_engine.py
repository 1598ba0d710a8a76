"""LLMEngine: add requests, call step() repeatedly, read each request's new tokens.

One step = schedule (which sequences, how many tokens each, within the token budget and
the KV pool) -> one forward pass over the paged cache -> sample for the sequences whose
prompt is fully computed -> detokenize, check stops, finish what is done.

A failure in one request's work fails that request alone (finish_reason "error", the cause
in its `error`) and the step goes on for the others: its grammar mask or sampling (the batch
is retried row by row to find it), its stop checks and detokenizing. A batched forward that
raises is retried one sequence at a time, so the sequence that makes it fail is failed
alone; when every sequence of a batch of two or more fails alone too, the fault is the
engine's, not a request's, and step() raises (AsyncLLMEngine counts those; a lone sequence
that fails is no evidence either way: `lone_failure`). The retries
cost nothing until something fails; a seeded request whose batch needed one may then draw
differently from a clean run, since the failed attempt already advanced its generator.
"""

from __future__ import annotations

import itertools
import math
import time

import torch

from lmstack.engine.config import EngineConfig
from lmstack.engine.kv_cache import BlockManager
from lmstack.engine.model_runner import ModelRunner
from lmstack.engine.outputs import RequestOutput, TokenLogprob
from lmstack.engine.sampler import Sampler
from lmstack.engine.sampling_params import SamplingParams
from lmstack.engine.scheduler import Scheduler, SchedulerConfig
from lmstack.engine.sequence import FinishReason, Sequence
from lmstack.errors import ContextLengthError, InputError
from lmstack.model.llama import shared_model

DEFAULT_KV_TOKENS = 16384


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, **overrides):
        config = config or EngineConfig()
        for key, value in overrides.items():
            if not hasattr(config, key):
                raise InputError(f"unknown engine option {key!r}")
            setattr(config, key, value)
        config.validate()
        self.config = config
        # Weights are read-only at inference: engines of the same model and dtype share them.
        self.model, self.tokenizer = shared_model(config.model, config.dtype)
        window = self.model.config.max_position_embeddings
        self.max_model_len = min(config.max_model_len or window, window)
        per_block = ModelRunner.bytes_per_block(self.model, config.block_size)
        if config.kv_cache_gb is not None:
            num_blocks = int(config.kv_cache_gb * 1e9 // per_block)
        else:
            num_blocks = math.ceil((config.num_kv_tokens or DEFAULT_KV_TOKENS) / config.block_size)
        if num_blocks < 1:
            raise InputError(
                f"kv_cache_gb {config.kv_cache_gb} holds no block of {per_block} bytes"
            )
        self.block_manager = BlockManager(
            num_blocks, config.block_size, config.enable_prefix_caching
        )
        self.runner = ModelRunner(self.model, num_blocks, config.block_size)
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=config.max_num_batched_tokens,
                max_waiting=config.max_waiting,
                max_model_len=self.max_model_len,
            ),
            self.block_manager,
        )
        self.sampler = Sampler(self.model.config.vocab_size, seed=config.seed)
        self._grammar = None
        self._ids = itertools.count()
        self.num_generation_tokens = 0
        self.num_prompt_tokens = 0
        # Greedy rows under a grammar check their argmax before computing a mask
        # (grammar.sample_constrained); False computes every mask first (the tests' reference).
        self.greedy_grammar_first = True
        self.num_grammar_rows = 0  # rows sampled under a grammar
        self.num_grammar_masks = 0  # of those, rows whose full mask was computed
        self._aborted: list[Sequence] = []
        self.lone_failure = False  # the last step ran one sequence and its forward failed

    # ---------------------------------------------------------------- requests

    @property
    def grammar(self):
        if self._grammar is None:
            from lmstack.engine.grammar import GrammarCompiler

            self._grammar = GrammarCompiler(self.model.source, self.model.config.vocab_size)
        return self._grammar

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        priority: int = 0,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> str:
        """Queue a request; raises InputError (bad input) or QueueFullError (queue bound)."""
        seq = self.make_sequence(prompt, params, priority, timeout, request_id)
        self.add_sequence(seq)
        return seq.request_id

    @property
    def max_request_tokens(self) -> int:
        """The most tokens (prompt + output) one request can hold: window and KV pool."""
        return min(self.max_model_len, self.kv_capacity_tokens)

    @property
    def kv_capacity_tokens(self) -> int:
        return self.block_manager.num_blocks * self.block_manager.block_size

    def make_sequence(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        priority: int = 0,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> Sequence:
        """Validate, tokenize and compile a request's grammar without touching the scheduler,
        so callers on other threads can do this work while a step runs."""
        params = params or SamplingParams()
        params.validate(self.max_model_len, self.model.config.vocab_size)
        if isinstance(prompt, str):
            prompt_ids = self.tokenizer.encode(prompt)
        else:
            prompt_ids = list(prompt)
            vocab = self.model.config.vocab_size
            if not all(isinstance(t, int) and 0 <= t < vocab for t in prompt_ids):
                raise InputError(f"prompt token ids must be integers in [0, {vocab})")
        if not prompt_ids:
            raise InputError("the prompt is empty")
        if len(prompt_ids) >= self.max_model_len:
            raise ContextLengthError(len(prompt_ids), self.max_model_len)
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise InputError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) = "
                f"{len(prompt_ids) + params.max_tokens} exceeds the context window of "
                f"{self.max_model_len} tokens"
            )
        capacity = self.kv_capacity_tokens
        if len(prompt_ids) + params.max_tokens > capacity:
            raise InputError(
                f"prompt + max_tokens = {len(prompt_ids) + params.max_tokens} tokens exceeds "
                f"the whole KV cache ({capacity} tokens); raise kv_cache_gb"
            )
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise InputError(f"priority must be an integer, got {priority!r}")
        timeout = self.config.default_timeout if timeout is None else timeout
        if timeout is not None and not 0 < timeout < math.inf:  # nan fails both sides
            raise InputError(f"timeout must be a finite number of seconds > 0, got {timeout}")
        matcher = self.grammar.matcher(params.structured) if params.structured else None
        request_id = request_id or f"req-{next(self._ids)}"
        now = time.monotonic()
        seq = Sequence(
            request_id,
            prompt_ids,
            params,
            priority=priority,
            arrival_time=now,
            deadline=None if timeout is None else now + timeout,
        )
        seq.decoder = self.tokenizer.stream_decoder(params.skip_special_tokens)
        seq.text = ""
        seq.emitted = 0
        seq.sent_tokens = 0
        seq.sent_logprobs = 0
        if matcher is not None:
            seq.matcher = matcher
        return seq

    def add_sequence(self, seq: Sequence) -> None:
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> bool:
        seq = self.scheduler.abort(request_id)
        if seq is not None:
            self._aborted.append(seq)
        return seq is not None

    def step_aborted_cleanup(self) -> None:
        """Forget aborted sequences whose outputs were already reported elsewhere."""
        self._aborted.clear()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._aborted)

    # ---------------------------------------------------------------- the step

    def step(self) -> list[RequestOutput]:
        self.lone_failure = False
        sched = self.scheduler.schedule()
        finished: list[Sequence] = list(sched.finished) + self._aborted
        self._aborted.clear()
        touched: list[Sequence] = []
        now = time.monotonic()
        for item in sched.scheduled:
            if item.seq.first_scheduled_time is None:
                item.seq.first_scheduled_time = now
        if sched.scheduled:
            logits, ready, failed = self._execute(sched.scheduled)
            self.scheduler.after_step(sched)
            if ready:
                touched = self._sample(logits, ready)
            finished += [seq for seq in failed if seq not in finished]
        outputs = [self._output_or_error(seq) for seq in touched]
        outputs += [self._output_or_error(seq) for seq in finished if seq not in touched]
        return outputs

    def _execute(self, batch: list) -> tuple[torch.Tensor, list[Sequence], list[Sequence]]:
        """The batched forward; when it raises, each sequence alone (see the module doc)."""
        try:
            return (*self.runner.execute(batch, self.block_manager), [])
        except Exception as exc:
            if len(batch) == 1:
                self._fail(batch[0].seq, "the model forward failed", exc)
                self.lone_failure = True
                return torch.empty(0, self.model.config.vocab_size), [], [batch[0].seq]
            error = exc
        rows, ready, failed = [], [], []
        for item in batch:
            try:
                logits, seqs = self.runner.execute([item], self.block_manager)
            except Exception as exc:
                self._fail(item.seq, "the model forward failed", exc)
                failed.append(item.seq)
                continue
            rows.append(logits)
            ready += seqs
        if len(failed) == len(batch):
            raise RuntimeError(f"the batched forward failed for every sequence: {error}")
        return torch.cat(rows), ready, failed

    def _fail(self, seq: Sequence, what: str, exc: BaseException) -> None:
        seq.error = f"{what}: {type(exc).__name__}: {exc}"
        self.scheduler.finish_seq(seq, FinishReason.ERROR)

    def _output_or_error(self, seq: Sequence) -> RequestOutput:
        try:
            return self.output(seq)
        except Exception as exc:  # e.g. its detokenizer: the request ends with the error
            self._fail(seq, "detokenizing failed", exc)
            error = seq.error
            return RequestOutput(seq.request_id, seq.num_prompt_tokens, [], "", "", [], True,
                                 FinishReason.ERROR, error=error)  # fmt: skip

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[Sequence]:
        try:
            results = self._sample_rows(logits, seqs)
        except Exception:  # find the row that raised: retry one row at a time
            results = []
            for i, seq in enumerate(seqs):
                try:
                    results += self._sample_rows(logits[i : i + 1], [seq])
                except Exception as exc:
                    self._fail(seq, "sampling failed", exc)
                    results.append(None)
        now = time.monotonic()
        for seq, result in zip(seqs, results):
            if result is None:
                continue
            try:
                self._append(seq, result, now)
            except Exception as exc:  # one bad request must not take the batch down
                self._fail(seq, "handling the sampled token failed", exc)
        return seqs

    def _sample_rows(self, logits: torch.Tensor, seqs: list[Sequence]) -> list:
        if all(s.matcher is None for s in seqs):
            return self.sampler(logits, seqs, None)
        from lmstack.engine.grammar import sample_constrained

        results, rows, masks = sample_constrained(
            self.sampler, logits, seqs, self.greedy_grammar_first
        )
        self.num_grammar_rows += rows
        self.num_grammar_masks += masks
        return results

    def _append(self, seq: Sequence, result, now: float) -> None:
        token = result.token_id
        params = seq.params
        if seq.first_token_time is None:
            seq.first_token_time = now
            self.num_prompt_tokens += seq.num_prompt_tokens
        matcher = seq.matcher
        stop_ids = params.stop_token_ids or ()
        is_eos = not params.ignore_eos and token in self.tokenizer.stop_token_ids
        if is_eos or token in stop_ids:
            if matcher is not None and not matcher.is_finished() and not matcher.accept(token):
                seq.error = f"grammar rejected end of sequence: {matcher.error}"
            self.scheduler.finish_seq(seq, FinishReason.STOP)
            return
        seq.append_token(token)
        self.num_generation_tokens += 1
        if result.logprob is not None:
            seq.logprobs.append(TokenLogprob(token, result.logprob, result.top_logprobs or []))
        seq.text += seq.decoder.push(token)
        if matcher is not None:
            if not matcher.accept(token):
                seq.error = f"grammar rejected token {token}: {matcher.error}"
                self.scheduler.finish_seq(seq, FinishReason.ERROR)
                return
            if matcher.is_finished():
                self.scheduler.finish_seq(seq, FinishReason.STOP)
                return
        if params.stop and self._hit_stop_string(seq):
            self.scheduler.finish_seq(seq, FinishReason.STOP)
        elif seq.num_output_tokens >= params.max_tokens or len(seq) >= self.max_model_len:
            self.scheduler.finish_seq(seq, FinishReason.LENGTH)

    def _hit_stop_string(self, seq: Sequence) -> bool:
        text = seq.text
        longest = max(len(s) for s in seq.params.stop)
        # Only the tail can contain a stop string that the last token completed.
        search_from = max(0, seq.emitted - longest)
        hits = [(text.find(s, search_from), s) for s in seq.params.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if not hits:
            return False
        index, stop = min(hits)
        keep = index + len(stop) if seq.params.include_stop_str_in_output else index
        seq.text = text[:keep]
        seq.stop_string_hit = True
        return True

    def output(self, seq: Sequence) -> RequestOutput:
        """The request's new tokens and text since its last output (advances the cursor)."""
        finished = seq.is_finished
        if finished and not seq.flushed:
            seq.flushed = True
            if not seq.stop_string_hit:
                seq.text += seq.decoder.flush()
        text = seq.text
        # Hold back a tail that could still grow into a stop string.
        hold = 0 if finished or not seq.params.stop else max(len(s) for s in seq.params.stop) - 1
        visible = max(seq.emitted, len(text) - hold)
        new_text = text[seq.emitted : visible]
        seq.emitted = visible
        out_ids = seq.output_token_ids
        new_ids = out_ids[seq.sent_tokens :]
        seq.sent_tokens = len(out_ids)
        new_logprobs = None
        if seq.params.logprobs is not None:
            new_logprobs = seq.logprobs[seq.sent_logprobs :]
            seq.sent_logprobs = len(seq.logprobs)
        return RequestOutput(
            request_id=seq.request_id,
            prompt_tokens=seq.num_prompt_tokens,
            new_token_ids=new_ids,
            new_text=new_text,
            text=text[:visible],
            token_ids=list(out_ids),
            finished=finished,
            finish_reason=seq.finish_reason,
            new_logprobs=new_logprobs,
            num_cached_tokens=seq.num_cached_tokens,
            arrival_time=seq.arrival_time,
            first_scheduled_time=seq.first_scheduled_time,
            first_token_time=seq.first_token_time,
            finish_time=seq.finish_time,
            error=seq.error,
        )

    # ---------------------------------------------------------------- stats

    @property
    def precision(self) -> dict:
        """The weights' precision as loaded ("auto" resolved), why, and the CPU it suits."""
        from lmstack.cpu import describe

        model = self.model
        return {"dtype": model.dtype_name, "reason": model.dtype_reason, "cpu": describe()}

    def stats(self) -> dict:
        sched = self.scheduler
        return {
            "num_running": sched.num_running,
            "num_waiting": sched.num_waiting,
            "kv_cache_usage": self.block_manager.usage,
            "num_preemptions": sched.num_preemptions,
            "num_timeouts": sched.num_timeouts,
            "num_rejected": sched.num_rejected,
            "prefix_cache_queries": self.block_manager.prefix_cache_queries,
            "prefix_cache_hits": self.block_manager.prefix_cache_hits,
            "prompt_tokens": self.num_prompt_tokens,
            "generation_tokens": self.num_generation_tokens,
        }
