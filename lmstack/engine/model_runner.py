"""Runs one scheduled batch through the model over the paged KV cache.

The KV cache is a pool of fixed-size blocks per layer: [layers, 2 (K, V), kv_heads,
blocks, block_size, head_dim]. Heads come before blocks so that gathering a sequence's blocks gives
keys already laid out [kv_heads, tokens, head_dim] for the matmuls, with no transpose copy.
A sequence's tokens live in the blocks of its block table, so memory is claimed block by
block as it grows, freed the moment it finishes, and shared between sequences with a common
prefix.

A step's tokens (decode tokens of running sequences and prefill chunks of new ones) are
flattened into one forward pass so every linear layer runs once on the whole batch; only
attention looks at sequences separately: all decode tokens together, each prefill chunk on
its own with a causal mask. Decode tokens attend through the compiled paged kernel
(lmstack.kernels), which reads keys and values in place from their blocks;
without a compiler they fall back to gathering the blocks into a padded copy for torch's
batched matmuls (3x slower per layer for 20 sequences of ~200 tokens). Where the kernel
has its AVX512-BF16 path (bf16, head size 64), prefill chunks read their blocks in place
too, through the tiled kernel (ops.paged_prefill: 16 query rows per pass over the keys):
4.1x torch's flash attention on a gathered copy for a 512-token prompt, 2.35x for 160
tokens after 3,000 (one layer, this CPU; `lmstack bench kernels`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmstack.engine.kv_cache import BlockManager
from lmstack.engine.scheduler import ScheduledSeq
from lmstack.engine.sequence import Sequence
from lmstack.kernels import ops
from lmstack.model.attention import sdpa
from lmstack.model.llama import LlamaForCausalLM

# fp32 prefill chunks that start this far into their sequence gather their blocks for
# torch's flash attention instead of the tiled kernel (PagedAttention._tiled).
FP32_TILED_MAX_START = 1024


@dataclass
class _Prefill:
    start: int  # first row of this chunk in the flattened batch
    length: int  # tokens in the chunk
    block_table: torch.Tensor  # [blocks] long
    context: int  # tokens visible after this chunk (cached + chunk)


class PagedAttention:
    """Attention context for one step (see lmstack.model.cache for the interface)."""

    def __init__(
        self,
        runner: ModelRunner,
        slots: torch.Tensor,
        decode_rows: torch.Tensor,
        decode_tables: torch.Tensor | None,
        decode_lengths: torch.Tensor | None,
        prefills: list[_Prefill],
    ):
        self.runner = runner
        self.slots = slots
        self.decode_rows = decode_rows
        self.decode_tables = decode_tables
        self.decode_lengths = decode_lengths
        self.prefills = prefills
        self._mask: torch.Tensor | None = None
        # Decided at the first layer, the same for all: "torch", "paged" (the kernel for
        # decode tokens) or "fast" (prefill chunks too, through a tiled kernel: bf16 on
        # AVX512-BF16, fp32 on AVX2).
        self._kernel = ""
        self._work: torch.Tensor | None = None  # the kernel's scratch, shared by all layers
        # Whether the step holds prompt tokens (set by ModelRunner.execute): block-quantized
        # layers with a bf16 copy then run on it (lmstack.model.qlinear.prompt_step).
        self.has_prompt_tokens = False

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        pool = self.runner.kv_cache[layer]  # [2 (K, V), kv_heads, blocks, block_size, d]
        _, kv_heads, _, _, dim = pool.shape
        # Store this step's keys/values in their slots before anyone reads them (K and V in
        # one call: on a CPU, small decode steps are bound by the number of kernel calls).
        pool.view(2, kv_heads, -1, dim).index_copy_(
            2, self.slots, torch.stack([k, v]).transpose(1, 2)
        )
        if not self.prefills:  # decode-only step: rows are already in batch order
            return self._decode(q, pool)
        out = torch.empty_like(q)
        if self.decode_tables is not None:
            out[self.decode_rows] = self._decode(q[self.decode_rows], pool)
        for p in self.prefills:
            rows = slice(p.start, p.start + p.length)
            if self._kernel_mode(q, pool) == "fast" and self._tiled(q, p):
                start = p.context - p.length
                out[rows] = ops.paged_prefill(q[rows], pool, p.block_table, start)
                continue
            kv = pool.index_select(2, p.block_table).flatten(2, 3)[:, :, : p.context]
            out[rows] = sdpa(q[rows].transpose(0, 1), kv[0], kv[1], causal=True).transpose(0, 1)
        return out

    def paged_layout(self):
        """Where this step's keys and values go and which each row attends to, for a model
        that runs all its layers in one call (lmstack.kernels.qops.layer_stack): (the whole
        KV cache, slots, decode rows, their block tables and lengths, prefill chunks as
        (first row, tokens, first position, block table address) rows). None unless the
        cache is fp32 and kernels are on."""
        pool = self.runner.kv_cache
        if not self.runner.use_kernel or pool.dtype != torch.float32 or not pool.is_contiguous():
            return None
        if any(p.context - p.length >= FP32_TILED_MAX_START for p in self.prefills):
            return None  # a late chunk of a long prompt: the per-layer path gathers it
        tables, lengths = self.decode_tables, self.decode_lengths
        if tables is None:
            tables = lengths = torch.zeros((0, 1), dtype=torch.long)
        chunks = [
            [p.start, p.length, p.context - p.length, p.block_table.data_ptr()]
            for p in self.prefills
        ]  # the tables stay alive with this context, for the duration of the call
        chunks = torch.tensor(chunks, dtype=torch.long).view(-1, 4)
        return pool, self.slots, self.decode_rows, tables, lengths, chunks

    @staticmethod
    def _tiled(q: torch.Tensor, chunk: _Prefill) -> bool:
        # The fp32 tiled kernel (AVX2) beats gathering + torch's flash attention for chunks
        # near the start of a sequence (512 tokens from 0: 1.15x, 130: 1.3x) but not late in
        # a long one (160 tokens after 3,000: 0.75x; `lmstack bench kernels`, AMD EPYC).
        return q.dtype != torch.float32 or chunk.context - chunk.length < FP32_TILED_MAX_START

    def _kernel_mode(self, q: torch.Tensor, pool: torch.Tensor) -> str:
        if not self._kernel:
            if not (self.runner.use_kernel and ops.supports_paged(q, pool)):
                self._kernel = "torch"
            else:
                self._kernel = "fast" if ops.tiled_prefill(q, pool) else "paged"
        return self._kernel

    def _decode(self, q: torch.Tensor, pool: torch.Tensor):
        if self._kernel_mode(q, pool) != "torch":
            if self._work is None:  # sized once for the step's longest sequence
                self._work = ops.decode_scratch(q, pool, int(self.decode_lengths.max()))
            return ops.paged_decode(q, pool, self.decode_tables, self.decode_lengths, self._work)
        return self._decode_torch(q, pool)

    def _decode_torch(self, q: torch.Tensor, pool: torch.Tensor):
        # q [B, H, d]. Every sequence's blocks are gathered into [kv_heads, B, S, d] (padded;
        # the additive mask hides the padding). Query heads are grouped under the key/value
        # head they share, so GQA needs no K/V copies: explicit batched matmuls here run ~10x
        # faster than torch's SDPA with enable_gqa and a mask for single-token queries.
        batch, heads, dim = q.shape
        kv_heads = pool.shape[1]
        # index_select is ~3x faster than advanced indexing for this gather on CPU.
        kv = pool.index_select(2, self.decode_tables.view(-1))
        keys, values = kv.view(2, kv_heads, batch, -1, dim)  # each [KVH, B, S, d]
        grouped = (q * dim**-0.5).view(batch, kv_heads, heads // kv_heads, dim).transpose(0, 1)
        if self._mask is None:
            key_pos = torch.arange(keys.shape[2])
            hidden = key_pos[None, :] >= self.decode_lengths[:, None]
            mask = torch.zeros(hidden.shape).masked_fill_(hidden, float("-inf"))
            self._mask = mask[:, None, :]  # additive, [B, 1, S] (per KV head)
        scores = (grouped @ keys.transpose(-1, -2)).float()  # [KVH, B, G, S]
        weights = torch.softmax(scores + self._mask, dim=-1).to(values.dtype)
        return (weights @ values).transpose(0, 1).reshape(batch, heads, dim)

    def finish_step(self, num_tokens: int) -> None:
        pass


class ModelRunner:
    def __init__(
        self, model: LlamaForCausalLM, num_blocks: int, block_size: int, use_kernel: bool = True
    ):
        cfg = model.config
        self.model = model
        self.use_kernel = use_kernel
        self.block_size = block_size
        shape = (
            cfg.num_hidden_layers,
            2,  # K and V
            cfg.num_key_value_heads,
            num_blocks,
            block_size,
            cfg.head_dim,
        )
        self.kv_cache = torch.zeros(shape, dtype=model.dtype)

    @property
    def kv_cache_bytes(self) -> int:
        return self.kv_cache.numel() * self.kv_cache.element_size()

    @staticmethod
    def bytes_per_block(model: LlamaForCausalLM, block_size: int) -> int:
        cfg = model.config
        elem = torch.empty((), dtype=model.dtype).element_size()
        return (
            2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.head_dim * elem
        )

    @torch.inference_mode()
    def execute(
        self, batch: list[ScheduledSeq], blocks: BlockManager
    ) -> tuple[torch.Tensor, list[Sequence]]:
        """Run the batch; return fp32 logits [M, V] for the M sequences ready to sample."""
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        decode_rows: list[int] = []
        decode_seqs: list[Sequence] = []
        prefills: list[_Prefill] = []
        sample_rows: list[int] = []
        sample_seqs: list[Sequence] = []
        has_prompt = False
        for item in batch:
            seq, n = item.seq, item.num_tokens
            start = seq.num_computed_tokens
            row = len(tokens)
            has_prompt = has_prompt or start < seq.num_prompt_tokens
            tokens.extend(seq.token_ids[start : start + n])
            positions.extend(range(start, start + n))
            slots.extend(blocks.slot_mapping(seq, start, start + n))
            if n == 1 and start > 0:
                decode_rows.append(row)
                decode_seqs.append(seq)
            else:
                table = torch.tensor(seq.block_table, dtype=torch.long)
                prefills.append(_Prefill(row, n, table, start + n))
            if start + n == len(seq):
                sample_rows.append(row + n - 1)
                sample_seqs.append(seq)

        decode_tables = lengths = None
        if decode_seqs:
            width = max(len(s.block_table) for s in decode_seqs)
            decode_tables = torch.zeros(len(decode_seqs), width, dtype=torch.long)
            lengths = torch.empty(len(decode_seqs), dtype=torch.long)
            for i, s in enumerate(decode_seqs):
                decode_tables[i, : len(s.block_table)] = torch.tensor(s.block_table)
                lengths[i] = s.num_computed_tokens + 1

        ctx = PagedAttention(
            self,
            torch.tensor(slots, dtype=torch.long),
            torch.tensor(decode_rows, dtype=torch.long),
            decode_tables,
            lengths,
            prefills,
        )
        ctx.has_prompt_tokens = has_prompt
        hidden = self.model(torch.tensor(tokens), torch.tensor(positions), ctx)
        if not sample_rows:
            return hidden.new_empty((0, self.model.config.vocab_size), dtype=torch.float32), []
        logits = self.model.compute_logits(hidden[torch.tensor(sample_rows)])
        return logits, sample_seqs
