"""`pdserve` command line: `generate`, `serve`, `demo`; `router` and `bench` as they land."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import fields

from pdserve.backends import BACKENDS
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine_config import EngineConfig

# Sampling flags of `generate`, mapped onto SamplingParams fields (defaults come from there).
_SAMPLING_FLAGS = {
    "max_tokens": "tokens to generate",
    "temperature": "0 means greedy",
    "top_p": "nucleus sampling mass, in (0, 1]",
    "top_k": "keep the k likeliest tokens (0: all)",
    "min_p": "drop tokens below min_p times the likeliest token's probability",
    "repetition_penalty": "divide logits of tokens seen in prompt or output (>1 discourages)",
    "presence_penalty": "subtract from logits of tokens already generated",
    "frequency_penalty": "subtract per occurrence in the output",
    "seed": "per-request seed: same seed, same output",
    "min_tokens": "tokens to generate before eos may end the output",
    "ignore_eos": "keep generating past eos",
}


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    defaults = {f.name: f.default for f in fields(SamplingParams)}
    types = {"max_tokens": int, "top_k": int, "seed": int, "min_tokens": int}
    for name, help_text in _SAMPLING_FLAGS.items():
        flag = "--" + name.replace("_", "-")
        default = defaults[name]
        if name == "max_tokens":
            default = 64
        if isinstance(default, bool):
            p.add_argument(flag, action="store_true", help=help_text)
        else:
            p.add_argument(
                flag,
                type=types.get(name, float),
                default=default,
                help=f"{help_text} (default: {default})",
            )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="offline generation, printing text as it is produced")
    g.add_argument(
        "--model",
        default="tiny",
        help="model directory (config.json, *.safetensors, tokenizer) or 'tiny'",
    )
    g.add_argument("--prompt", required=True, help="the prompt text")
    g.add_argument(
        "--chat",
        action="store_true",
        help="wrap the prompt as a user message with the model's chat template",
    )
    g.add_argument("--backend", choices=BACKENDS, default="auto", help="compute backend")
    g.add_argument("--block-size", type=int, default=64, help="tokens per KV block")
    g.add_argument("--quantization", choices=("wint8", "wint4", "block_wise_fp8"), default=None,
                   help="weight-only quantization at load")  # fmt: skip
    g.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="longest prompt + output in tokens (default: the model's limit)",
    )
    _add_sampling_flags(g)
    s = sub.add_parser("serve", help="run a node: OpenAI-compatible HTTP API over the engine")
    EngineConfig.add_cli_args(s)
    r = sub.add_parser("router", help="run a router: the OpenAI API over prefill/decode nodes")
    from pdserve.router.main import RouterConfig

    RouterConfig.add_cli_args(r)
    d = sub.add_parser("demo", help="start a node, stream one chat request through it, stop")
    d.add_argument("--model", default="tiny", help="model directory or 'tiny'")
    d.add_argument("--prompt", default=None, help="the user message")
    d.add_argument("--max-tokens", type=int, default=64, help="tokens to generate")
    return parser


def _sampling_params(args: argparse.Namespace) -> SamplingParams:
    try:
        return SamplingParams(**{name: getattr(args, name) for name in _SAMPLING_FLAGS})
    except ValueError as e:  # messages start with the field name; name the flag instead
        name, _, rest = str(e).partition(" ")
        raise ValueError(f"--{name.replace('_', '-')} {rest}") from None


def cmd_generate(args: argparse.Namespace) -> int:
    from pdserve.detokenizer import IncrementalDetokenizer
    from pdserve.engine.llm import LLM

    params = _sampling_params(args)
    llm = LLM(args.model, args.backend, args.block_size, args.max_model_len,
              quantization=args.quantization, progress=sys.stderr.isatty())  # fmt: skip
    tok = llm.tokenizer
    if args.chat:
        prompt_ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": args.prompt}]))
    else:
        prompt_ids = tok.encode(args.prompt, add_special_tokens=True)
    detok = IncrementalDetokenizer(tok)
    start = time.perf_counter()
    first = None
    n = 0
    reason = None
    for step in llm.generate([prompt_ids], [params]):
        if not step:
            continue  # a prefill chunk that sampled nothing yet
        first = first or time.perf_counter()
        n += 1
        reason = step[0][1].finish_reason
        sys.stdout.write(detok.step([step[0][1].token_id]))
        sys.stdout.flush()
    sys.stdout.write(detok.flush() + "\n")
    end = time.perf_counter()
    ttft = (first or end) - start
    rate = (n - 1) / (end - first) if first and n > 1 and end > first else 0.0
    print(
        f"[{len(prompt_ids)} prompt tokens, {n} generated, finish_reason={reason}, "
        f"TTFT {ttft * 1e3:.1f} ms, {rate:.1f} tokens/s]",
        file=sys.stderr,
    )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from pdserve.log import setup_logging
    from pdserve.node.main import serve

    config = EngineConfig.from_args(args)
    setup_logging("node")
    return asyncio.run(serve(config))


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "router":
            import asyncio

            from pdserve.log import setup_logging
            from pdserve.router.main import RouterConfig, serve_router

            config = RouterConfig.from_args(args)
            setup_logging("router")
            return asyncio.run(serve_router(config))
        if args.command == "demo":
            from pdserve.demo import DEMO_PROMPT, run_demo

            return run_demo(args.model, args.prompt or DEMO_PROMPT, args.max_tokens)
    except ValueError as e:  # bad input: a message, not a traceback
        print(f"pdserve {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
