"""Conversions between gRPC messages and the engine's types."""

from __future__ import annotations

from pydantic import ValidationError

from pdserve.engine.messages import EngineStats
from pdserve.engine.sampling_params import SamplingParams
from pdserve.kvtransfer.schema import CudaIpcPool
from pdserve.openai.engine_protocol import TokenDelta
from pdserve.proto import pdserve_pb2 as pb


def load_info(s: EngineStats) -> pb.LoadInfo:
    """A node's load as GetLoad answers it and heartbeats carry it."""
    return pb.LoadInfo(num_running=s.num_running, num_waiting=s.num_waiting,
                       free_blocks=s.num_free_blocks, total_blocks=s.num_blocks,
                       queued_prefill_tokens=s.queued_prefill_tokens)  # fmt: skip


def cuda_ipc_from_proto(dest: pb.KVDestination) -> CudaIpcPool | None:
    """The GPU pool a KV destination names (None when it names none); ValueError saying what
    is wrong with a malformed one."""
    if not dest.cuda_ipc_handle:
        return None
    try:
        return CudaIpcPool(handle=dest.cuda_ipc_handle, offset=dest.cuda_ipc_offset,
                           nbytes=dest.cuda_ipc_nbytes)  # fmt: skip
    except ValidationError as e:
        raise ValueError(f"rank {dest.rank}'s cuda_ipc_handle: {e.errors()[0]['msg']}") from None


def cuda_ipc_to_proto(pool: CudaIpcPool | None) -> dict:
    """KVDestination's cuda_ipc_* fields for `pool` (none when None)."""
    if pool is None:
        return {}
    return dict(cuda_ipc_handle=pool.handle, cuda_ipc_offset=pool.offset,
                cuda_ipc_nbytes=pool.nbytes)  # fmt: skip


def params_to_proto(p: SamplingParams) -> pb.SamplingParams:
    msg = pb.SamplingParams(
        temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, min_p=p.min_p,
        repetition_penalty=p.repetition_penalty, presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty, max_tokens=p.max_tokens, min_tokens=p.min_tokens,
        stop_token_ids=list(p.stop_token_ids), ignore_eos=p.ignore_eos,
    )  # fmt: skip
    if p.seed is not None:
        msg.seed = p.seed
    if p.logprobs is not None:
        msg.logprobs = p.logprobs
    return msg


def params_from_proto(msg: pb.SamplingParams) -> SamplingParams:
    """ValueError (naming the field) for values SamplingParams refuses."""
    return SamplingParams(
        temperature=msg.temperature, top_p=msg.top_p, top_k=msg.top_k, min_p=msg.min_p,
        repetition_penalty=msg.repetition_penalty, presence_penalty=msg.presence_penalty,
        frequency_penalty=msg.frequency_penalty, max_tokens=msg.max_tokens,
        min_tokens=msg.min_tokens, stop_token_ids=tuple(msg.stop_token_ids),
        ignore_eos=msg.ignore_eos, seed=msg.seed if msg.HasField("seed") else None,
        logprobs=msg.logprobs if msg.HasField("logprobs") else None,
    )  # fmt: skip


def delta_to_chunk(d: TokenDelta, kv_bytes: int = 0) -> pb.TokenChunk:
    top = None
    if d.top_logprobs is not None:
        top = [pb.TokenLogprobs(top=[pb.TopLogprob(token_id=t, logprob=lp) for t, lp in row])
               for row in d.top_logprobs]  # fmt: skip
    return pb.TokenChunk(
        token_ids=d.token_ids, logprobs=d.logprobs, top_logprobs=top,
        finish_reason=d.finish_reason or "", num_prompt_tokens=d.num_prompt_tokens,
        num_cached_tokens=d.num_cached_tokens, kv_bytes_received=kv_bytes,
    )  # fmt: skip


def chunk_to_delta(c: pb.TokenChunk, want_top: bool) -> TokenDelta:
    top = (
        [[(t.token_id, t.logprob) for t in row.top] for row in c.top_logprobs] if want_top else None
    )
    return TokenDelta(
        token_ids=list(c.token_ids), logprobs=list(c.logprobs), top_logprobs=top,
        finish_reason=c.finish_reason or None, num_prompt_tokens=c.num_prompt_tokens,
        num_cached_tokens=c.num_cached_tokens,
    )  # fmt: skip
