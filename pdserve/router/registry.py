"""The router's view of its nodes: who they are, how loaded, whether alive, and who pairs with whom.

Nodes come from static lists (`--prefill-nodes`, `--decode-nodes`, `--mixed-nodes`, each a list
of gRPC HOST:PORT) or register themselves (`--router` on a node) and heartbeat. A node whose model,
tokenizer, block size or KV dtype differs from the first accepted one is refused, so the router
never pairs nodes that would exchange KV they cannot read.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field

import grpc

from pdserve.decode_node.prefill_client import CHANNEL_OPTIONS
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc

logger = logging.getLogger("pdserve.router")

HEARTBEAT_INTERVAL_S = 1.0
EXPIRE_AFTER_S = 5.0  # a registered node silent this long is dropped
FAILURES_TO_EJECT = 3  # consecutive failed calls before a node is marked down


@dataclass
class NodeState:
    addr: str  # gRPC HOST:PORT
    info: pb.NodeInfo
    stub: pb_grpc.NodeStub
    channel: grpc.aio.Channel
    static: bool
    load: pb.LoadInfo = field(default_factory=pb.LoadInfo)
    last_seen: float = field(default_factory=time.monotonic)
    failures: int = 0
    inflight: int = 0  # requests this router has open on the node
    served: int = 0

    @property
    def role(self) -> str:
        return self.info.role

    @property
    def healthy(self) -> bool:
        return self.failures < FAILURES_TO_EJECT

    def as_json(self) -> dict:
        return {"addr": self.addr, "role": self.role, "node_id": self.info.node_id,
                "healthy": self.healthy, "static": self.static, "inflight": self.inflight,
                "served": self.served, "free_blocks": self.load.free_blocks,
                "total_blocks": self.load.total_blocks, "running": self.load.num_running,
                "queued_prefill_tokens": self.load.queued_prefill_tokens}  # fmt: skip


class Registry:
    def __init__(self, tokenizer_fingerprint: str) -> None:
        self.tokenizer_fingerprint = tokenizer_fingerprint
        self.nodes: dict[str, NodeState] = {}
        self.reference: pb.NodeInfo | None = None  # the first node: what the others must match

    def check(self, info: pb.NodeInfo) -> str:
        """Why this node cannot join ("" if it can)."""
        if info.role not in ("prefill", "decode", "mixed"):
            return f"unknown role {info.role!r}"
        if info.tokenizer_fingerprint != self.tokenizer_fingerprint:
            return "its tokenizer differs from the router's"
        ref = self.reference
        if ref is not None:
            for name in ("model_fingerprint", "block_size", "kv_dtype"):
                if getattr(info, name) != getattr(ref, name):
                    return f"its {name} differs from the other nodes'"
        if info.role != "mixed":  # prefill rank r pushes to decode rank r: sizes must agree
            for node in self.nodes.values():
                other = node.info
                if (
                    other.role != "mixed"
                    and other.node_id != info.node_id
                    and (other.tp_size != info.tp_size)
                ):
                    return (f"its tensor-parallel size {info.tp_size} differs from "
                            f"{other.role} node {node.addr}'s {other.tp_size}")  # fmt: skip
        return ""

    def add(self, addr: str, info: pb.NodeInfo, static: bool) -> str:
        reason = self.check(info)
        if reason:
            logger.warning("refused node %s (%s): %s", addr, info.role, reason)
            return reason
        self.reference = self.reference or info
        old = self.nodes.get(addr)
        if old is not None:
            old.info, old.last_seen, old.failures = info, time.monotonic(), 0
            return ""
        channel = grpc.aio.insecure_channel(addr, options=CHANNEL_OPTIONS)
        self.nodes[addr] = NodeState(addr, info, pb_grpc.NodeStub(channel), channel, static)
        logger.info("node %s joined as %s (%s)", addr, info.role, info.node_id)
        return ""

    def heartbeat(self, node_id: str, load: pb.LoadInfo) -> bool:
        for node in self.nodes.values():
            if node.info.node_id == node_id:
                node.load, node.last_seen, node.failures = load, time.monotonic(), 0
                return True
        return False

    async def expire(self) -> None:
        now = time.monotonic()
        for addr, node in list(self.nodes.items()):
            if not node.static and now - node.last_seen > EXPIRE_AFTER_S:
                logger.warning("node %s went silent; dropped", addr)
                del self.nodes[addr]
                await node.channel.close()

    def healthy(self, role: str) -> list[NodeState]:
        return [n for n in self.nodes.values() if n.role == role and n.healthy]

    def pick_decode(self, exclude: set[str] = frozenset()) -> NodeState | None:
        """Most free KV blocks, then fewest running (counting what this router just sent)."""
        nodes = [
            n for n in self.healthy("decode") or self.healthy("mixed") if n.addr not in exclude
        ]
        if not nodes:
            return None
        return max(nodes, key=lambda n: (n.load.free_blocks - n.inflight * 4,
                                         -(n.load.num_running + n.inflight)))  # fmt: skip

    def pick_prefill(self, prompt: list[int], block_size: int) -> list[NodeState]:
        """Prefill nodes in order of preference: fewest queued prefill tokens, ties broken by
        prefix affinity (the same first block goes to the same node, where it is cached)."""
        nodes = self.healthy("prefill")
        if not nodes:
            return []
        head = str(prompt[:block_size]).encode()
        affinity = int.from_bytes(hashlib.blake2b(head, digest_size=4).digest(), "little")
        preferred = nodes[affinity % len(nodes)].addr

        def cost(n: NodeState) -> tuple:
            queued = n.load.queued_prefill_tokens + n.inflight * len(prompt)
            return (queued // max(1, len(prompt)), n.addr != preferred, n.addr)

        return sorted(nodes, key=cost)

    async def close(self) -> None:
        for node in self.nodes.values():
            await node.channel.close()
