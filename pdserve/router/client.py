"""The router's EngineClient: each request goes to a decode node (with a prefill node named)
or a mixed node, over gRPC `Node.Generate`."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

import grpc

from pdserve.engine.sampling_params import SamplingParams
from pdserve.metrics import NodeMetrics
from pdserve.node.proto_convert import chunk_to_delta, params_to_proto
from pdserve.openai.engine_protocol import EngineDeadError, RequestRejected, TokenDelta
from pdserve.proto import pdserve_pb2 as pb
from pdserve.router.registry import Registry

logger = logging.getLogger("pdserve.router")

# Errors that say the node is in trouble (not the request): count them against its health.
_NODE_FAULTS = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL,
                grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNKNOWN}  # fmt: skip
STREAM_DEADLINE_S = 3600.0


class RouterEngineClient:
    def __init__(
        self, registry: Registry, eos_token_ids: tuple[int, ...], metrics: NodeMetrics
    ) -> None:
        self.registry = registry
        self.eos_token_ids = eos_token_ids
        self.metrics = metrics
        self.inflight = 0

    @property
    def num_running(self) -> int:
        return self.inflight

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[TokenDelta]:
        """Stream from a decode node; a decode node that fails before the first token is
        replaced once; after it, the stream ends with an error."""
        tried: set[str] = set()
        self.inflight += 1
        mx = self.metrics
        mx.running.set(self.inflight)
        start = last = time.monotonic()
        num_tokens = 0
        try:
            for attempt in range(2):
                decode = self.registry.pick_decode(exclude=tried)
                if decode is None:
                    raise EngineDeadError("no decode or mixed node is available")
                tried.add(decode.addr)
                prefills = []
                if decode.role == "decode":
                    prefills = self.registry.pick_prefill(prompt_token_ids,
                                                          decode.info.block_size)  # fmt: skip
                    if not prefills:
                        raise EngineDeadError("no prefill node is available")
                req = pb.GenerateRequest(
                    request_id=request_id, prompt_token_ids=prompt_token_ids,
                    params=params_to_proto(params), eos_token_ids=list(self.eos_token_ids),
                    prefill_node=prefills[0].addr if prefills else "",
                    fallback_prefill_nodes=[p.addr for p in prefills[1:2]],
                )  # fmt: skip
                started = False
                nodes = [decode, *prefills[:1]]
                for n in nodes:
                    n.inflight += 1
                call = decode.stub.Generate(req, timeout=STREAM_DEADLINE_S)
                try:
                    async for chunk in call:
                        started = True
                        now = time.monotonic()
                        (mx.tpot if num_tokens else mx.ttft).observe(now - last)
                        last, num_tokens = now, num_tokens + len(chunk.token_ids)
                        if chunk.finish_reason:
                            mx.e2e.observe(now - start)
                            mx.requests.labels(chunk.finish_reason).inc()
                            mx.prompt_tokens.inc(chunk.num_prompt_tokens)
                            mx.generation_tokens.inc(num_tokens)
                        yield chunk_to_delta(chunk, params.logprobs is not None)
                    decode.failures = 0
                    decode.served += 1
                    return
                except grpc.aio.AioRpcError as e:
                    code = e.code()
                    if code == grpc.StatusCode.INVALID_ARGUMENT:
                        raise RequestRejected(e.details() or "rejected") from None
                    if code == grpc.StatusCode.ABORTED:  # its prefill node failed, not it
                        raise EngineDeadError(e.details() or "prefill failed") from None
                    if code in _NODE_FAULTS:
                        decode.failures += 1
                    logger.warning("decode node %s failed %s (%s: %s)", decode.addr,
                                   "mid-stream" if started else "before the first token",
                                   code.name, e.details())  # fmt: skip
                    if started or attempt == 1:
                        raise EngineDeadError(f"decode node failed: {e.details()}") from None
                finally:
                    call.cancel()  # a client that went away aborts it on the node
                    for n in nodes:
                        n.inflight -= 1
        finally:
            self.inflight -= 1
            mx.running.set(self.inflight)

    async def abort(self, request_id: str) -> None:
        """Aborts travel as gRPC cancellation of the Generate stream (see `generate`)."""
