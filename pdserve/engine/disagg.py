"""The engine's side of prefill/decode disaggregation (DESIGN.md section 2).

Prefill role: a request carries a `KVPush`; every step that computes part of its prompt sends,
layer by layer as the forward pass writes them, the prompt blocks the step touched to the decode
node's blocks; once the first token is sampled the transfer is closed and the request's result
waits for the receiver's acknowledgement (every byte landed) before it is reported.

Decode role: a request admitted with `remote_prefill` holds blocks for its whole prompt and waits
(WAITING_FOR_REMOTE_KV) while the receiver collects its layers; when the frontend reports the
prefill node's first token, the request starts decoding from it, or, if the transfer did not
complete, recomputes its prompt locally from the blocks it already had.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from pdserve.engine.engine_core import EngineCore, RequestOutput
from pdserve.engine.request import Request
from pdserve.engine.scheduler import StepPlan
from pdserve.engine.worker_protocol import KVJob
from pdserve.kvtransfer.sender import KVTransferError

logger = logging.getLogger("pdserve.engine")


@dataclass
class KVPush:
    """Prefill side: where one request's prompt KV goes. Block indices count prompt blocks."""

    transfer_id: str
    first_block: int  # the first prompt block the decode node still needs
    num_prompt_blocks: int
    sent_upto: int  # prompt blocks [first_block, sent_upto) are sent (each once, when final)


@dataclass
class LayerPush:
    """A step's per-layer hook on rank 0 and the same pushes for the other ranks."""

    hook: Callable[[int], None]
    jobs: list[KVJob]

    def __call__(self, layer: int) -> None:
        self.hook(layer)


@dataclass
class PrefillResult:
    """Prefill side: what the frontend replies to `Prefill` with, once the transfer is acked."""

    request_id: str
    ok: bool
    error: str
    output: RequestOutput | None
    kv_bytes: int
    transport: str = ""  # "ipc" or "zmq"


class PrefillHandoff:
    def __init__(self, core: EngineCore, sender, ack_timeout_s: float = 30.0) -> None:
        self.core = core
        self.sender = sender
        self.ack_timeout_s = ack_timeout_s
        self.num_layers = core.runner.model.config.num_hidden_layers
        self.pushing: dict[str, Request] = {}  # request id -> request with a KVPush
        self.unacked: dict[str, RequestOutput] = {}  # transfer id -> the held-back first token
        self.sent: dict[str, int] = {}  # transfer id -> KV bytes sent so far
        self.transport: dict[str, str] = {}  # transfer id -> "ipc" | "zmq"
        self.failures: list[PrefillResult] = []  # transfers that failed before their ack
        self.doomed: list[str] = []  # requests of failed transfers, to abort after the step

    def start(self, req: Request, transfer_id: str, destinations: list, first_block: int) -> None:
        """Push `req`'s prompt KV from block `first_block` on: rank r's shard to
        `destinations[r]` (a `Destination` per tensor-parallel rank)."""
        num_blocks = self.core.blocks.blocks_needed(req.num_prompt_tokens)
        if not 0 <= first_block < num_blocks:
            raise ValueError(f"first_block {first_block} outside the prompt's {num_blocks} blocks")
        for dest in destinations:
            if len(dest.block_ids) != num_blocks - first_block:
                raise ValueError(f"{len(dest.block_ids)} destination blocks for "
                                 f"{num_blocks - first_block} prompt blocks")  # fmt: skip
        req.kv_push = KVPush(transfer_id, first_block, num_blocks, first_block)
        self.transport[transfer_id] = self.sender.start(
            transfer_id, destinations, timeout_s=self.ack_timeout_s
        )
        self.pushing[req.request_id] = req
        self.sent[transfer_id] = 0

    def layer_hook(self, plan: StepPlan) -> LayerPush | None:
        """What to send as each layer of this step's forward pass completes (every rank sends
        its shard of the same blocks)."""
        bs = self.core.blocks.block_size
        jobs = []
        for req, n in zip(plan.requests, plan.num_new_tokens):
            push = req.kv_push
            if not isinstance(push, KVPush):
                continue
            end = _final_blocks(push, req.num_computed_tokens + n, req.num_prompt_tokens, bs)
            if end > push.sent_upto:
                src = req.block_ids[push.sent_upto : end]
                jobs.append((push.transfer_id, src, push.sent_upto - push.first_block))
        if not jobs:
            return None
        kv = self.core.runner.kv_cache

        def hook(layer: int) -> None:
            for tid, src, offset in jobs:
                if tid in self.sent:  # not failed earlier in this step
                    try:
                        self.sent[tid] += self.sender.send_layer(tid, layer, kv, src, offset)
                    except (KVTransferError, ValueError) as e:
                        self._fail(tid, str(e))

        return LayerPush(hook, [KVJob(transfer_id=t, src_blocks=list(s), dst_offset=o)
                                for t, s, o in jobs])  # fmt: skip

    def after_step(self, plan: StepPlan, outputs: list[RequestOutput]) -> list[RequestOutput]:
        """Advance what is final at the destinations; hold back the outputs of pushed requests
        (their first token) until their transfer is acknowledged."""
        bs = self.core.blocks.block_size
        for req in plan.requests:
            push = req.kv_push
            if isinstance(push, KVPush):
                final = _final_blocks(push, req.num_computed_tokens, req.num_prompt_tokens, bs)
                push.sent_upto = max(push.sent_upto, final)
        kept = []
        for out in outputs:
            req = self.pushing.pop(out.request_id, None)
            if req is None:
                kept.append(out)
                continue
            push = req.kv_push
            assert isinstance(push, KVPush)
            if push.transfer_id not in self.sent:
                continue  # it failed during this step; its result is reported already
            try:
                self.sender.finish(push.transfer_id, self.num_layers,
                                   push.num_prompt_blocks - push.first_block)  # fmt: skip
            except (KVTransferError, ValueError) as e:
                self.pushing[out.request_id] = req
                self._fail(push.transfer_id, str(e))
                continue
            self.unacked[push.transfer_id] = out
        self._abort_doomed()
        return kept

    def _fail(self, transfer_id: str, error: str) -> None:
        """A transfer that cannot go on (the decode node is gone, rejected a frame, timed out):
        stop computing its prompt and report the failure to the frontend."""
        logger.warning("KV transfer %s failed: %s", transfer_id, error)
        sent = self.sent.pop(transfer_id, 0)
        self.transport.pop(transfer_id, None)
        self.sender.abort(transfer_id)
        for rid, req in list(self.pushing.items()):
            if isinstance(req.kv_push, KVPush) and req.kv_push.transfer_id == transfer_id:
                del self.pushing[rid]
                self.doomed.append(rid)  # aborted once the step that may be running is over
                self.failures.append(PrefillResult(rid, False, error, None, sent))

    def _abort_doomed(self) -> None:
        for rid in self.doomed:
            self.core.abort(rid)
        self.doomed.clear()

    def poll(self) -> list[PrefillResult]:
        """Transfers acknowledged (or failed, or timed out) since the last poll."""
        results, self.failures = self.failures, []
        for ack in self.sender.poll_acks():
            if ack.transfer_id not in self.unacked:  # failed while the prompt is computing
                if ack.transfer_id in self.sent and not ack.ok:
                    self._fail(ack.transfer_id, ack.error)
                continue
            out = self.unacked.pop(ack.transfer_id, None)
            sent = self.sent.pop(ack.transfer_id, 0) + ack.worker_bytes
            transport = self.transport.pop(ack.transfer_id, "")
            if out is not None:
                results.append(
                    PrefillResult(
                        out.request_id, ack.ok, ack.error, out if ack.ok else None, sent, transport
                    )
                )
        self._abort_doomed()
        return results

    @property
    def busy(self) -> bool:
        return bool(self.unacked or self.failures)

    def abort(self, request_id: str) -> None:
        req = self.pushing.pop(request_id, None)
        if req is not None and isinstance(req.kv_push, KVPush):
            self._drop(req.kv_push.transfer_id)
        for tid, out in list(self.unacked.items()):
            if out.request_id == request_id:
                self._drop(tid)

    def _drop(self, transfer_id: str) -> None:
        self.unacked.pop(transfer_id, None)
        self.sent.pop(transfer_id, None)
        self.transport.pop(transfer_id, None)
        self.sender.abort(transfer_id)


def _final_blocks(push: KVPush, computed: int, prompt_len: int, block_size: int) -> int:
    """Prompt blocks whose KV is final once `computed` tokens are: the full blocks, and the
    last, partial one only with the whole prompt. Each block is sent exactly once, so the
    receiver's "every layer of every block landed" really means the final bytes landed."""
    if computed >= prompt_len:
        return push.num_prompt_blocks
    return min(computed // block_size, push.num_prompt_blocks)


@dataclass
class RemoteWait:
    """Decode side: a request waiting for its prompt's KV."""

    req: Request
    transfer_id: str
    first_block: int  # prompt blocks before this one were already cached here


class DecodeHandoff:
    def __init__(self, core: EngineCore, receiver) -> None:
        self.core = core
        self.receiver = receiver
        self.num_layers = core.runner.model.config.num_hidden_layers
        self.waiting: dict[str, RemoteWait] = {}  # request id ->
        self.landed: dict[str, int] = {}  # transfer id -> bytes, transfers complete and acked

    def admitted(self, req: Request, transfer_id: str) -> RemoteWait:
        """Blocks are held: expect the prompt blocks not already cached here."""
        bs = self.core.blocks.block_size
        first = req.num_computed_tokens // bs
        num_blocks = self.core.blocks.blocks_needed(req.num_prompt_tokens)
        self.receiver.expect(transfer_id, req.block_ids[first:num_blocks], self.num_layers)
        wait = RemoteWait(req, transfer_id, first)
        self.waiting[req.request_id] = wait
        return wait

    def poll(self) -> None:
        for result in self.receiver.poll():
            if result.ok:
                self.landed[result.transfer_id] = result.bytes
            else:
                logger.warning("KV transfer %s failed: %s", result.transfer_id, result.error)

    def complete(self, request_id: str, first_token: int, logprob: float) -> RequestOutput | None:
        """The prefill node's reply arrived: start decoding from its first token. Returns the
        first token's output, or None when the KV did not land (the caller falls back)."""
        wait = self.waiting.get(request_id)
        if wait is None or wait.transfer_id not in self.landed:
            return None
        del self.waiting[request_id]
        self.landed.pop(wait.transfer_id)
        req = wait.req
        core = self.core
        core.scheduler.activate_remote(req, req.num_prompt_tokens)
        core.blocks.cache_blocks(req)
        return core.accept_token(req, first_token, logprob, None)

    def retarget(self, request_id: str, transfer_id: str) -> RemoteWait | None:
        """Expect the prompt's KV under a new transfer id (a retry on another prefill node);
        frames of the old one are dropped from now on."""
        wait = self.waiting.get(request_id)
        if wait is None:
            return None
        self.receiver.cancel(wait.transfer_id)
        self.landed.pop(wait.transfer_id, None)
        wait.transfer_id = transfer_id
        req = wait.req
        n = self.core.blocks.blocks_needed(req.num_prompt_tokens)
        self.receiver.expect(transfer_id, req.block_ids[wait.first_block : n], self.num_layers)
        return wait

    def fallback(self, request_id: str) -> bool:
        """Recompute the prompt here, from the prefix that was cached before the transfer."""
        wait = self.waiting.pop(request_id, None)
        if wait is None:
            return False
        self.receiver.cancel(wait.transfer_id)
        self.landed.pop(wait.transfer_id, None)
        bs = self.core.blocks.block_size
        self.core.scheduler.activate_remote(wait.req, wait.first_block * bs)
        return True

    def abort(self, request_id: str) -> None:
        wait = self.waiting.pop(request_id, None)
        if wait is not None:
            self.receiver.cancel(wait.transfer_id)
            self.landed.pop(wait.transfer_id, None)
