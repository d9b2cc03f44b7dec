"""The peer of bench_engine.py: transformers' `Ernie4_5_MoeForCausalLM`, bf16, random weights.

The model is built from a config dict on the device itself (transformers' initializer, std
0.02, runs there), so nothing is uploaded from the host. Timings are host wall time around
synchronised calls, in milliseconds, as bench_engine.py times our engine:
  prefill   one forward of one sequence, with a fresh DynamicCache (what generate's first
            step does) and logits for the last token only;
  decode    one forward of one token per sequence over a DynamicCache already holding
            `context` tokens (it grows by one token per timed step);
  compiled  generate(cache_implementation="static"), which compiles the decode step with
            torch.compile (CUDA graphs); the step time is the difference of two generate
            lengths over the difference of their token counts, so the prefill cancels.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM, Ernie4_5_MoeConfig

# keys of a checkpoint's config.json that are not fields of Ernie4_5_MoeConfig
_NOT_FIELDS = ("architectures", "model_type", "torch_dtype")


def load(config: dict[str, Any], device: str) -> torch.nn.Module:
    """Ernie4_5_MoeForCausalLM of `config` in bf16, weights drawn on `device`."""
    cfg = Ernie4_5_MoeConfig(**{k: v for k, v in config.items() if k not in _NOT_FIELDS})
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    return model.eval()


def describe(model: torch.nn.Module) -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "experts_implementation": getattr(model.config, "_experts_implementation", None),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def _sync(model: torch.nn.Module) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)


def _time(model: torch.nn.Module, fn: Callable[[], object], warmup: int, repeat: int) -> list:
    for _ in range(warmup):
        fn()
    runs = []
    for _ in range(repeat):
        _sync(model)
        t0 = time.perf_counter()
        fn()
        _sync(model)
        runs.append((time.perf_counter() - t0) * 1e3)
    return runs


def _ids(model: torch.nn.Module, batch: int, tokens: int, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (batch, tokens), generator=g)
    return ids.to(model.device)


@torch.inference_mode()
def prefill_ms(model: torch.nn.Module, tokens: int, warmup: int, repeat: int) -> list[float]:
    ids = _ids(model, 1, tokens, seed=tokens)
    return _time(
        model, lambda: model(input_ids=ids, use_cache=True, logits_to_keep=1), warmup, repeat
    )


@torch.inference_mode()
def decode_ms(
    model: torch.nn.Module, batch: int, context: int, warmup: int, repeat: int
) -> list[float]:
    ids = _ids(model, batch, context + 1, seed=batch)
    cache = model(input_ids=ids[:, :context], use_cache=True, logits_to_keep=1).past_key_values
    step = ids[:, context:]  # [B, 1]
    runs = _time(
        model, lambda: model(input_ids=step, past_key_values=cache, use_cache=True), warmup, repeat
    )
    return runs


@torch.inference_mode()
def compiled_decode_ms(
    model: torch.nn.Module, batch: int, context: int, short: int = 8, long: int = 40
) -> float:
    """Decode step time of generate with a static cache (compiled); the first call compiles.
    The longer generate runs first, so the shorter one reuses its cache and compiled graph."""
    ids = _ids(model, batch, context, seed=batch + 1)
    mask = torch.ones_like(ids)

    def generate(n: int) -> float:
        _sync(model)
        t0 = time.perf_counter()
        model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            cache_implementation="static",
            pad_token_id=0,
        )
        _sync(model)
        return time.perf_counter() - t0

    generate(long)  # compiles
    t_long = min(generate(long) for _ in range(2))
    t_short = min(generate(short) for _ in range(2))
    return (t_long - t_short) / (long - short) * 1e3


def empty_cache() -> None:
    """Give the allocator's cached blocks back to the device (after the model is dropped)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
