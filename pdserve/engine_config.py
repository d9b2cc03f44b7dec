"""EngineConfig: every flag of `pdserve serve`, with FastDeploy's names, defaults and meanings.

The argparse parser is generated from the dataclass, so a flag, its default and its help live in
one place. Flags FastDeploy users pass that pdserve does not implement yet are accepted by the
parser and then refused with a message that says so, never silently ignored.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import MISSING, dataclass, field, fields
from typing import Any


def _flag(help_text: str, **kw: Any) -> Any:
    default = kw.pop("default", MISSING)
    return field(default=default, metadata={"help": help_text, **kw})


@dataclass(frozen=True)
class EngineConfig:
    model: str = _flag("model directory (config.json, *.safetensors, tokenizer) or 'tiny'",
                       default="tiny")  # fmt: skip
    served_model_name: str | None = _flag("model name in the API (default: --model)", default=None)
    host: str = _flag("HTTP bind address", default="127.0.0.1")
    port: int = _flag("OpenAI HTTP API port", default=8000)
    metrics_port: int = _flag("Prometheus /metrics port (also served on --port)", default=8001)
    engine_worker_queue_port: int = _flag(
        "engine's ZeroMQ port for its workers and in-host peers", default=8002)  # fmt: skip
    cache_queue_port: int = _flag("base port of the per-rank KV endpoints", default=8003)
    pd_comm_port: int | None = _flag(
        "gRPC Node service port (default: a free port, reported to the router and to in-host "
        "peers)", default=None)  # fmt: skip
    internal_host: str = _flag("bind address of gRPC, KV and engine ports", default="127.0.0.1")
    splitwise_role: str = _flag("mixed, prefill or decode", default="mixed",
                                choices=("mixed", "prefill", "decode"))  # fmt: skip
    tensor_parallel_size: int = _flag("tensor-parallel ranks", default=1)
    backend: str = _flag("compute backend", default="auto", choices=("numpy", "cupy", "auto"))
    quantization: str | None = _flag(
        "weight-only quantization at load: wint8, wint4, block_wise_fp8",
        default=None)  # fmt: skip
    max_model_len: int = _flag("longest prompt + output, in tokens", default=2048)
    max_num_seqs: int = _flag("running requests at most", default=8)
    max_num_batched_tokens: int | None = _flag(
        "tokens per step at most (default: 8192 with chunked prefill, else --max-model-len)",
        default=None)  # fmt: skip
    block_size: int = _flag("tokens per KV block", default=64)
    gpu_memory_utilization: float = _flag("share of GPU memory for weights, activations and KV",
                                          default=0.9)  # fmt: skip
    kv_cache_ratio: float = _flag("share of KV blocks new prefills may take", default=0.75)
    num_gpu_blocks_override: int | None = _flag("KV blocks in the pool, overriding sizing",
                                                default=None)  # fmt: skip
    enable_prefix_caching: bool = _flag("reuse KV of shared prompt prefixes", default=True)
    swap_space: float = _flag("GiB of CPU memory keeping evicted prefix blocks", default=0.0)
    enable_chunked_prefill: bool = _flag(
        "split long prompts across steps (off if FD_DISABLE_CHUNKED_PREFILL=1)", default=True
    )
    api_key: str | None = _flag("bearer token required on the HTTP API (or FD_API_KEY)",
                                default=None)  # fmt: skip
    max_concurrency: int = _flag("requests in flight at most; more get HTTP 429", default=512)
    max_request_body_bytes: int = _flag("largest HTTP request body; more get HTTP 413",
                                        default=16 * 1024 * 1024)  # fmt: skip
    innode_prefill_ports: str | None = _flag(
        "decode role: engine-worker-queue ports of in-host prefill nodes, comma-separated",
        default=None)  # fmt: skip
    router: str | None = _flag("HOST:PORT of a router's gRPC port to register with",
                               default=None)  # fmt: skip
    advertise_host: str | None = _flag("address peers are told (default: --internal-host)",
                                       default=None)  # fmt: skip
    cache_transfer_protocol: str = _flag("KV transports, in order of preference: ipc,zmq",
                                         default="ipc,zmq")  # fmt: skip
    pd_fallback: str = _flag("when a remote prefill fails: recompute locally, or fail (503)",
                             default="local", choices=("local", "fail"))  # fmt: skip
    pd_timeout: float = _flag("seconds a decode node waits for a prefill node", default=60.0)
    kv_checksum: bool = _flag("checksum every KV layer frame", default=False)
    timeout_graceful_shutdown: float = _flag("seconds SIGTERM waits for in-flight requests",
                                             default=10.0)  # fmt: skip
    speculative_config: str | None = _flag("speculative decoding JSON", default=None)
    graph_optimization_config: str | None = _flag(
        'CUDA graph JSON: {"use_cudagraph": bool, "cudagraph_capture_sizes": [1, 2, ...], '
        '"max_capture_batch_size": N, "graph_opt_level": 0}; decode runs in CUDA graphs on '
        'the GPU backend unless "use_cudagraph" is false', default=None)  # fmt: skip
    use_cudagraph: bool = _flag("capture decode in CUDA graphs (the GPU default)", default=False)

    def __post_init__(self) -> None:
        for name in ("port", "metrics_port", "engine_worker_queue_port", "cache_queue_port",
                     "pd_comm_port"):  # fmt: skip
            if getattr(self, name) is not None and not 0 < getattr(self, name) < 65536:
                raise ValueError(
                    f"--{_dash(name)} must be a port number, got {getattr(self, name)}"
                )
        for name in ("max_model_len", "max_num_seqs", "block_size", "max_concurrency",
                     "max_request_body_bytes"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"--{_dash(name)} must be >= 1, got {getattr(self, name)}")
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override < 1:
            raise ValueError("--num-gpu-blocks-override must be >= 1")
        if self.swap_space < 0:
            raise ValueError(f"--swap-space must be >= 0 GiB, got {self.swap_space}")
        if not 0.0 < self.kv_cache_ratio <= 1.0:
            raise ValueError(f"--kv-cache-ratio must be in (0, 1], got {self.kv_cache_ratio}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError("--max-num-batched-tokens must be >= 1")
        if not self.enable_chunked_prefill and self.batched_tokens < self.max_model_len:
            raise ValueError(f"without chunked prefill, --max-num-batched-tokens "
                             f"({self.batched_tokens}) must be >= --max-model-len "
                             f"({self.max_model_len})")  # fmt: skip
        if self.innode_prefill_ports and self.splitwise_role != "decode":
            raise ValueError("--innode-prefill-ports is for decode nodes (--splitwise-role decode)")
        protocols = self.cache_transfer_protocol.split(",")
        if not protocols or not set(protocols) <= {"ipc", "zmq"}:
            raise ValueError(f"--cache-transfer-protocol {self.cache_transfer_protocol!r}: "
                             "use ipc, zmq or ipc,zmq")  # fmt: skip
        if self.tensor_parallel_size < 1:
            raise ValueError("--tensor-parallel-size must be >= 1")
        if self.pd_timeout <= 0:
            raise ValueError("--pd-timeout must be > 0 seconds")
        if self.timeout_graceful_shutdown < 0:
            raise ValueError("--timeout-graceful-shutdown must be >= 0 seconds")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("--gpu-memory-utilization must be in (0, 1]")
        self._refuse_unbuilt()
        _graph_options(self.graph_optimization_config)  # a malformed one fails here

    def _refuse_unbuilt(self) -> None:
        """Accepted for FastDeploy compatibility, not implemented yet: say so."""
        unbuilt = {
            "tensor_parallel_size": self.tensor_parallel_size > 1 and self.backend == "cupy",
            "quantization": self.quantization
            not in (None, "none", "wint8", "wint4", "block_wise_fp8"),
            "speculative_config": self.speculative_config is not None,
        }
        for name, used in unbuilt.items():
            if used:
                raise ValueError(f"--{_dash(name)} {getattr(self, name)!r}: not implemented yet "
                                 "in pdserve")  # fmt: skip

    def cudagraph_capture_sizes(self, default_max: int) -> list[int]:
        """Decode batch sizes to capture as CUDA graphs on a GPU backend ([]: graphs off).
        Default: 1, 2, 4, 8 and multiples of 16 up to min(--max-num-seqs, default_max)."""
        opts = _graph_options(self.graph_optimization_config)
        if not opts.get("use_cudagraph", True) and not self.use_cudagraph:
            return []
        limit = min(self.max_num_seqs, opts.get("max_capture_batch_size", default_max))
        sizes = opts.get("cudagraph_capture_sizes")
        if sizes is None:
            return default_capture_sizes(limit)
        return sorted({s for s in sizes if s <= self.max_num_seqs})

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model

    @property
    def batched_tokens(self) -> int:
        if self.max_num_batched_tokens is not None:
            return self.max_num_batched_tokens
        return 8192 if self.enable_chunked_prefill else self.max_model_len

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        for f in fields(cls):
            meta = dict(f.metadata)
            help_text = meta.pop("help")
            flag = "--" + _dash(f.name)
            if f.type in (bool, "bool"):
                parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                                    help=help_text)  # fmt: skip
                continue
            kind = str(f.type).split(" ")[0]
            conv = {"int": int, "float": float}.get(kind, str)
            default = f.default
            parser.add_argument(flag, type=conv, default=default,
                                help=f"{help_text} (default: {default})", **meta)  # fmt: skip

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> EngineConfig:
        values = {f.name: getattr(args, f.name) for f in fields(cls)}
        if os.environ.get("FD_DISABLE_CHUNKED_PREFILL") == "1":
            values["enable_chunked_prefill"] = False
        if values["api_key"] is None:
            values["api_key"] = os.environ.get("FD_API_KEY") or None
        return cls(**values)


def default_capture_sizes(max_size: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 up to max_size (and max_size itself): a decode
    batch pads by at most 15 rows above 8."""
    sizes = {s for s in (1, 2, 4, 8) if s <= max_size} | set(range(16, max_size + 1, 16))
    return sorted(sizes | {max_size}) if max_size >= 1 else []


_GRAPH_KEYS = {"use_cudagraph": bool, "cudagraph_capture_sizes": list,
               "max_capture_batch_size": int, "graph_opt_level": int}  # fmt: skip


def _graph_options(text: str | None) -> dict[str, Any]:
    """--graph-optimization-config parsed and checked (ValueError naming the flag)."""
    if text is None:
        return {}
    flag = "--graph-optimization-config"
    try:
        opts = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{flag}: not valid JSON ({e})") from None
    if not isinstance(opts, dict):
        raise ValueError(f"{flag}: expected a JSON object, got {text!r}")
    for key, value in opts.items():
        kind = _GRAPH_KEYS.get(key)
        if kind is None:
            raise ValueError(f"{flag}: unknown key {key!r}; known: {', '.join(_GRAPH_KEYS)}")
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ValueError(f"{flag}: {key} must be a {kind.__name__}, got {value!r}")
    sizes = opts.get("cudagraph_capture_sizes")
    if sizes is not None and not all(type(s) is int and 1 <= s <= 4096 for s in sizes):
        raise ValueError(f"{flag}: cudagraph_capture_sizes must be ints in [1, 4096]")
    if not 1 <= opts.get("max_capture_batch_size", 1) <= 4096:
        raise ValueError(f"{flag}: max_capture_batch_size must be in [1, 4096]")
    if opts.get("graph_opt_level", 0) != 0:
        raise ValueError(f"{flag}: graph_opt_level {opts['graph_opt_level']} (static graph "
                         "compilation) is not implemented in pdserve; use 0")  # fmt: skip
    return opts


def _dash(name: str) -> str:
    return name.replace("_", "-")
