"""BlockManager and Scheduler on synthetic sequences: no model, pure bookkeeping."""

from __future__ import annotations

import itertools
import random

import pytest

from lmstack.engine.kv_cache import BlockManager
from lmstack.engine.sampling_params import SamplingParams
from lmstack.engine.scheduler import QueueFullError, Scheduler, SchedulerConfig, SchedulerOutput
from lmstack.engine.sequence import FinishReason, Sequence, SequenceStatus
from lmstack.errors import LmstackError

_ids = itertools.count()


def make_seq(
    tokens: list[int] | int,
    priority: int = 0,
    arrival: float | None = None,
    deadline: float | None = None,
    max_tokens: int = 16,
) -> Sequence:
    if isinstance(tokens, int):
        base = 1000 * next(_ids)  # distinct content per sequence: no accidental prefix hits
        tokens = list(range(base, base + tokens))
    n = next(_ids)
    return Sequence(
        f"r{n}",
        tokens,
        SamplingParams(max_tokens=max_tokens),
        priority=priority,
        arrival_time=float(n) if arrival is None else arrival,
        deadline=deadline,
    )


def compute(bm: BlockManager, seq: Sequence, n: int) -> None:
    """What a scheduled step does to one sequence: reserve, compute, publish."""
    assert bm.ensure_slots(seq, n)
    seq.num_computed_tokens += n
    bm.cache_full_blocks(seq)


def check_pool(bm: BlockManager, holders: list[Sequence]) -> None:
    """Ref counts equal the number of block tables holding each block; nothing leaks."""
    bm.check_invariants()
    refs = [0] * bm.num_blocks
    for seq in holders:
        assert len(set(seq.block_table)) == len(seq.block_table)
        for b in seq.block_table:
            refs[b] += 1
    assert refs == [b.ref_count for b in bm.blocks]
    used = sum(r > 0 for r in refs)
    assert bm.num_free_blocks + used == bm.num_blocks
    assert 0.0 <= bm.usage <= 1.0
    assert bm.usage == pytest.approx(used / bm.num_blocks)
    for b, r in enumerate(refs):
        if r > 1:  # shared only through a prefix hit, which needs a published hash
            assert bm.blocks[b].hash is not None


# ---- BlockManager ---------------------------------------------------------------------------


def test_allocate_and_free_accounting():
    bm = BlockManager(10, block_size=4)
    a, b = make_seq(10), make_seq(5)
    assert bm.allocate_prefix(a) == 0
    assert bm.ensure_slots(a, 10) and len(a.block_table) == 3
    assert bm.allocate_prefix(b) == 0
    assert bm.ensure_slots(b, 5) and len(b.block_table) == 2
    assert not set(a.block_table) & set(b.block_table)
    assert bm.num_free_blocks == 5 and bm.usage == pytest.approx(0.5)
    check_pool(bm, [a, b])
    # Growing within the last block needs nothing; crossing into the next block takes one.
    a.num_computed_tokens = 10
    assert bm.ensure_slots(a, 2) and len(a.block_table) == 3
    assert bm.ensure_slots(a, 3) and len(a.block_table) == 4
    assert bm.slot(a, 13) == a.block_table[3] * 4 + 1
    assert bm.slot_mapping(a, 3, 6) == [
        a.block_table[0] * 4 + 3,
        a.block_table[1] * 4,
        a.block_table[1] * 4 + 1,
    ]
    bm.free(a)
    assert a.block_table == [] and a.num_computed_tokens == 0
    assert bm.num_free_blocks == 8
    check_pool(bm, [b])
    bm.free(b)
    assert bm.num_free_blocks == 10 and bm.usage == 0.0
    check_pool(bm, [])


def test_ensure_slots_is_all_or_nothing():
    bm = BlockManager(4, block_size=4)
    a, b = make_seq(12), make_seq(8)
    bm.allocate_prefix(a)
    assert bm.ensure_slots(a, 12)
    bm.allocate_prefix(b)
    assert not bm.can_allocate(b, 8)
    assert not bm.ensure_slots(b, 8)  # needs 2, only 1 free
    assert b.block_table == [] and bm.num_free_blocks == 1
    assert bm.can_allocate(b, 4) and bm.ensure_slots(b, 4)
    assert bm.num_free_blocks == 0 and bm.usage == 1.0
    check_pool(bm, [a, b])


def test_prefix_hit_of_shared_40_token_prefix():
    bm = BlockManager(16, block_size=16)
    prefix = list(range(100, 140))
    first = make_seq(prefix)
    bm.allocate_prefix(first)
    compute(bm, first, 40)  # 2 full blocks published, the third is partial
    second = make_seq(prefix + [7, 8, 9])
    assert bm.allocate_prefix(second) == 32
    assert second.num_computed_tokens == second.num_cached_tokens == 32
    assert second.block_table == first.block_table[:2]
    assert bm.blocks[first.block_table[0]].ref_count == 2
    # Looked up: first's 2 full blocks (missed) and second's 2 (hit), in tokens.
    assert bm.prefix_cache_queries == 64 and bm.prefix_cache_hits == 32
    compute(bm, second, second.num_uncomputed_tokens)
    assert second.block_table[2] != first.block_table[2]  # partial blocks are never shared
    check_pool(bm, [first, second])
    # A different token inside block 1 hits block 0 only.
    third = make_seq(prefix[:20] + [1] + prefix[21:])
    assert bm.allocate_prefix(third) == 16
    check_pool(bm, [first, second, third])


def test_last_token_block_is_never_a_hit():
    bm = BlockManager(8, block_size=16)
    prompt = list(range(500, 532))
    first = make_seq(prompt)
    bm.allocate_prefix(first)
    compute(bm, first, 32)
    assert len(bm.hash_to_block_id) == 2
    again = make_seq(list(prompt))  # exactly 32 tokens: block 1 holds the last token
    assert bm.allocate_prefix(again) == 16
    assert again.num_uncomputed_tokens == 16
    one_block = make_seq(prompt[:16])
    assert bm.allocate_prefix(one_block) == 0


def test_freed_cached_block_is_reused():
    bm = BlockManager(6, block_size=4)
    prompt = list(range(9))
    first = make_seq(prompt)
    bm.allocate_prefix(first)
    compute(bm, first, 9)
    cached = first.block_table[:2]
    bm.free(first)
    assert bm.num_free_blocks == 6 and bm.num_cached_free_blocks == 2
    later = make_seq(prompt + [42])
    assert bm.allocate_prefix(later) == 8
    assert later.block_table == cached
    assert bm.num_cached_free_blocks == 0 and bm.num_free_blocks == 4
    check_pool(bm, [later])


def test_eviction_drops_least_recently_freed_hashed_block():
    bm = BlockManager(4, block_size=4)
    old, new = make_seq(list(range(0, 5))), make_seq(list(range(50, 55)))
    for s in (old, new):
        bm.allocate_prefix(s)
        compute(bm, s, 5)
    old_block, new_block = old.block_table[0], new.block_table[0]
    bm.free(old)
    bm.free(new)
    assert bm.num_cached_free_blocks == 2
    # The 2 unhashed free blocks go first; the third allocation must evict, oldest first.
    filler = make_seq(12)
    bm.allocate_prefix(filler)
    assert bm.ensure_slots(filler, 12)
    assert old_block in filler.block_table and new_block not in filler.block_table
    assert bm.blocks[old_block].hash is None
    assert len(bm.hash_to_block_id) == 1 and bm.num_cached_free_blocks == 1
    check_pool(bm, [filler])
    assert bm.allocate_prefix(make_seq(list(range(0, 5)))) == 0
    probe = make_seq(list(range(50, 55)))
    assert bm.allocate_prefix(probe) == 4 and probe.block_table == [new_block]


def test_prefix_caching_disabled():
    bm = BlockManager(8, block_size=4, enable_prefix_caching=False)
    a = make_seq(list(range(9)))
    bm.allocate_prefix(a)
    compute(bm, a, 9)
    assert bm.hash_to_block_id == {}
    b = make_seq(list(range(9)))
    assert bm.allocate_prefix(b) == 0
    bm.free(a)
    assert bm.num_free_blocks == 8


# ---- Scheduler ------------------------------------------------------------------------------


def make_sched(num_blocks: int = 64, block_size: int = 4, **cfg) -> Scheduler:
    return Scheduler(SchedulerConfig(**cfg), BlockManager(num_blocks, block_size))


def run_step(sched: Scheduler, now: float = 0.0) -> SchedulerOutput:
    """One engine step: schedule, 'compute', sample a token for every seq that is caught up."""
    out = sched.schedule(now)
    check_step(sched, out)
    sched.after_step(out)
    for item in out.scheduled:
        seq = item.seq
        if seq.status is SequenceStatus.RUNNING and seq.num_uncomputed_tokens == 0:
            seq.append_token(7)
            if seq.num_output_tokens >= seq.params.max_tokens:
                sched.finish_seq(seq, FinishReason.LENGTH)
    return out


def check_step(sched: Scheduler, out: SchedulerOutput) -> None:
    cfg = sched.config
    assert out.num_batched_tokens <= cfg.max_num_batched_tokens
    assert sched.num_running <= cfg.max_num_seqs
    seen = set()
    for item in out.scheduled:
        assert 1 <= item.num_tokens <= item.seq.num_uncomputed_tokens
        assert item.seq.status is SequenceStatus.RUNNING
        assert item.seq.seq_id not in seen
        seen.add(item.seq.seq_id)
        bs = sched.block_manager.block_size
        assert len(item.seq.block_table) * bs >= item.seq.num_computed_tokens + item.num_tokens
    for seq in sched.waiting_seqs():
        assert seq.block_table == [] and seq.status is SequenceStatus.WAITING
    check_pool(sched.block_manager, sched.running)


def test_priority_then_fcfs_admission():
    sched = make_sched(max_num_seqs=2)
    low = [make_seq(4, priority=5) for _ in range(3)]
    for s in low:
        sched.add(s)
    urgent = make_seq(4, priority=0)  # arrives last
    sched.add(urgent)
    out = sched.schedule(0.0)
    assert [i.seq for i in out.scheduled] == [urgent, low[0]]
    assert sched.waiting_seqs() == [low[1], low[2]]


def test_chunked_prefill_shares_budget_with_decode():
    sched = make_sched(num_blocks=64, block_size=4, max_num_batched_tokens=32)
    decoder = make_seq(5, max_tokens=100)
    sched.add(decoder)
    run_step(sched)
    assert decoder.num_output_tokens == 1 and decoder.num_uncomputed_tokens == 1
    long = make_seq(100)
    sched.add(long)
    chunks = []
    for _ in range(4):
        out = run_step(sched)
        got = {id(i.seq): i.num_tokens for i in out.scheduled}
        assert got[id(decoder)] == 1
        assert out.scheduled[0].seq is decoder  # running ones come first
        chunks.append(got[id(long)])
    assert chunks == [31, 31, 31, 7]
    assert long.num_output_tokens == 1 and long.num_computed_tokens == 100
    assert decoder.num_output_tokens == 5


def test_max_num_seqs_cap():
    sched = make_sched(max_num_seqs=3)
    seqs = [make_seq(4) for _ in range(5)]
    for s in seqs:
        sched.add(s)
    out = run_step(sched)
    assert len(out.scheduled) == 3 and sched.num_running == 3 and sched.num_waiting == 2
    out = run_step(sched)
    assert sched.num_running == 3 and len(out.scheduled) == 3


def test_blocked_queue_head_is_not_overtaken():
    sched = make_sched(num_blocks=8, block_size=4)
    hog = make_seq(23, max_tokens=50)
    sched.add(hog)
    run_step(sched)  # 6 blocks held, 2 free
    big = make_seq(12, priority=0)  # needs 3 blocks
    small = make_seq(3, priority=1)  # would fit in 1, but must wait behind big
    sched.add(small)
    sched.add(big)
    out = run_step(sched)
    assert [i.seq for i in out.scheduled] == [hog]
    assert sched.waiting_seqs() == [big, small] and big.block_table == []
    assert sched.block_manager.num_free_blocks == 2


def test_preemption_picks_lowest_priority_latest_and_resumes():
    # 6 blocks of 4: three 7-token prompts fill the pool once each grows past 8 tokens.
    sched = make_sched(num_blocks=6, block_size=4)
    a = make_seq(7, priority=0, max_tokens=4)
    b = make_seq(7, priority=1, max_tokens=4)
    c = make_seq(7, priority=1, max_tokens=4)  # same class as b, arrived later: the victim
    for s in (c, b, a):
        sched.add(s)
    run_step(sched)  # prefill: 2 blocks each, 1 token sampled -> 8 tokens
    run_step(sched)  # decode the 8th token, sample the 9th: each now needs a 3rd block
    assert sched.block_manager.num_free_blocks == 0
    out = run_step(sched)
    assert out.preempted == [c]
    assert c.status is SequenceStatus.WAITING and c.num_preemptions == 1
    assert c.block_table == [] and c.num_computed_tokens == 0
    assert len(c.token_ids) == 9 and c.num_output_tokens == 2  # sampled tokens are kept
    assert {id(i.seq) for i in out.scheduled} == {id(a), id(b)}
    assert sched.num_preemptions == 1
    resumed_at = None
    for step in range(20):
        out = run_step(sched)
        for item in out.scheduled:
            if item.seq is c and resumed_at is None:
                resumed_at = step
                # Re-admitted: recomputes prompt + kept outputs (minus any prefix hit).
                assert item.num_tokens == 9 - c.num_cached_tokens
        if not sched.has_unfinished():
            break
    assert resumed_at is not None
    for s in (a, b, c):
        assert s.finish_reason == FinishReason.LENGTH and s.num_output_tokens == 4
    assert sched.block_manager.num_free_blocks == 6


def test_seq_that_is_itself_the_lowest_priority_preempts_itself():
    # a still has room in its 2nd block; b (priority 1) needs a 3rd and is the only victim.
    sched = make_sched(num_blocks=4, block_size=4)
    a = make_seq(5, priority=0, max_tokens=8)
    b = make_seq(7, priority=1, max_tokens=8)
    for s in (b, a):
        sched.add(s)
    run_step(sched)  # a: 6 tokens, b: 8 tokens
    run_step(sched)  # a: 7, b: 9 -> b needs a 3rd block next step
    d = make_seq(3, priority=0)  # would fit in the blocks b is about to release
    sched.add(d)
    out = run_step(sched)
    assert out.preempted == [b] and [i.seq for i in out.scheduled] == [a]
    assert out.num_batched_tokens == 1 and b.status is SequenceStatus.WAITING
    # Nothing is admitted in a step that had to preempt: the pool is known to be tight.
    assert sched.waiting_seqs() == [d, b]
    out = run_step(sched)
    assert [i.seq for i in out.scheduled] == [a, d]


def test_timeouts_of_waiting_and_running():
    sched = make_sched(max_num_seqs=1)
    running = make_seq(6, deadline=10.0)
    queued = make_seq(6, deadline=5.0)
    sched.add(running)
    sched.add(queued)
    run_step(sched, now=0.0)
    assert running.status is SequenceStatus.RUNNING and running.block_table
    out = sched.schedule(now=5.0)
    assert out.finished == [queued]
    assert queued.finish_reason == FinishReason.TIMEOUT and queued.finish_time == 5.0
    assert sched.num_waiting == 0 and [i.seq for i in out.scheduled] == [running]
    sched.after_step(out)
    out = sched.schedule(now=10.0)
    assert out.finished == [running] and out.scheduled == []
    assert running.finish_reason == "timeout" and running.block_table == []
    assert sched.block_manager.num_free_blocks == 64
    assert sched.num_timeouts == 2 and not sched.has_unfinished()
    assert sched.abort(running.request_id) is None  # forgotten once finished


def test_queue_bound():
    sched = make_sched(max_waiting=3, max_num_seqs=8)
    accepted = [make_seq(4, max_tokens=2) for _ in range(3)]
    for s in accepted:
        sched.add(s)
    with pytest.raises(QueueFullError, match=r"\(3 requests\)") as info:
        sched.add(make_seq(4))
    assert isinstance(info.value, LmstackError)
    assert sched.num_rejected == 1 and sched.num_waiting == 3
    for _ in range(10):
        run_step(sched)
    assert all(s.finish_reason == FinishReason.LENGTH for s in accepted)
    sched.add(make_seq(4))  # room again once the queue drained


def test_abort_waiting_and_running():
    sched = make_sched(max_num_seqs=1)
    running, queued = make_seq(9), make_seq(9)
    sched.add(running)
    sched.add(queued)
    run_step(sched)
    assert running.block_table
    assert sched.abort(queued.request_id) is queued
    assert queued.finish_reason == FinishReason.ABORT and sched.num_waiting == 0
    assert sched.abort(running.request_id) is running
    assert running.is_finished and running.block_table == [] and sched.num_running == 0
    assert sched.block_manager.num_free_blocks == 64
    assert sched.abort("nope") is None and not sched.has_unfinished()


def test_finished_request_keeps_its_cached_token_count():
    sched = make_sched(block_size=4)
    prompt = list(range(300, 313))
    first = make_seq(prompt, max_tokens=1)
    sched.add(first)
    run_step(sched)
    assert first.is_finished and first.num_cached_tokens == 0
    second = make_seq(prompt, max_tokens=1)
    sched.add(second)
    out = run_step(sched)
    assert out.scheduled[0].num_tokens == 1  # 12 of 13 prompt tokens came from the cache
    assert second.is_finished and second.block_table == []
    assert second.num_cached_tokens == 12  # still reported after its blocks were freed


def test_seq_outgrowing_the_whole_pool_ends_with_length():
    sched = make_sched(num_blocks=4, block_size=4)  # 16 tokens in all
    seq = make_seq(15, max_tokens=10)
    sched.add(seq)
    run_step(sched)  # 16 tokens
    run_step(sched)  # 17: could never fit, not even alone
    out = run_step(sched)
    assert out.finished == [seq] and seq.finish_reason == FinishReason.LENGTH
    assert out.preempted == [] and not sched.has_unfinished()
    assert sched.block_manager.num_free_blocks == 4


def test_oversized_prompt_is_refused():
    sched = make_sched(num_blocks=4, block_size=4, max_model_len=100)
    with pytest.raises(LmstackError):
        sched.add(make_seq(17))  # larger than the whole pool: would block the queue forever
    with pytest.raises(LmstackError):
        sched.add(make_seq([]))


@pytest.mark.parametrize("seed", [1234, 7, 99])
def test_random_simulation_runs_to_completion(seed: int):
    sched = simulate(seed)
    # The pool is small enough that the run exercised the hard paths, not just the easy ones.
    assert sched.num_preemptions > 0
    assert sched.block_manager.prefix_cache_hits > 0


def simulate(seed: int) -> Scheduler:
    """20 random requests through a tight pool, with aborts and deadlines; checks every step."""
    rng = random.Random(seed)
    sched = make_sched(
        num_blocks=24, block_size=4, max_num_seqs=6, max_num_batched_tokens=24, max_waiting=64
    )
    bm = sched.block_manager
    shared = [rng.randrange(50) for _ in range(12)]  # common system prompt: exercises hits
    pending = []
    for i in range(20):
        n = rng.randint(1, 50)
        prompt = (shared[: rng.choice([0, 4, 8, 12])] + [rng.randrange(50) for _ in range(n)])[:60]
        deadline = rng.uniform(5, 200) if rng.random() < 0.15 else None
        pending.append(
            make_seq(prompt, rng.randint(0, 3), float(i), deadline, max_tokens=rng.randint(1, 20))
        )
    all_seqs = list(pending)
    kv: dict[int, int] = {}  # slot -> token whose K/V it holds: catches any cross-talk
    for step in range(5000):
        now = float(step)
        while pending and rng.random() < 0.5:
            sched.add(pending.pop(0))
        out = sched.schedule(now)
        check_step(sched, out)
        for item in out.scheduled:
            s, start = item.seq, item.seq.num_computed_tokens
            for pos in range(start):  # every computed position still holds its own token
                assert kv[bm.slot(s, pos)] == s.token_ids[pos]
            for pos, slot in zip(
                range(start, start + item.num_tokens),
                bm.slot_mapping(s, start, start + item.num_tokens),
                strict=True,
            ):
                kv[slot] = s.token_ids[pos]
        sched.after_step(out)
        for item in out.scheduled:
            s = item.seq
            if s.status is SequenceStatus.RUNNING and s.num_uncomputed_tokens == 0:
                s.append_token(rng.randrange(50))
                if s.num_output_tokens >= s.params.max_tokens:
                    sched.finish_seq(s, FinishReason.LENGTH, now)
        if sched.running and rng.random() < 0.03:
            sched.abort(rng.choice(sched.running).request_id)
        if rng.random() < 0.02 and sched.num_waiting:
            sched.abort(rng.choice(sched.waiting_seqs()).request_id)
        check_pool(bm, sched.running)
        if not pending and not sched.has_unfinished():
            break
    else:
        pytest.fail("simulation did not finish")
    assert bm.num_free_blocks == bm.num_blocks and bm.usage == 0.0
    assert sched.requests == {}
    reasons = {s.finish_reason for s in all_seqs}
    assert all(s.is_finished for s in all_seqs)
    assert FinishReason.LENGTH in reasons and reasons <= {"length", "abort", "timeout"}
    for s in all_seqs:
        assert s.num_output_tokens <= s.params.max_tokens
        if s.finish_reason == FinishReason.LENGTH:
            assert s.num_output_tokens == s.params.max_tokens
    return sched
