"""A mixed node as users see it: the official openai client against a real `pdserve serve`."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from tests.integration.conftest import Node, http

GREEDY = {"temperature": 0, "max_tokens": 16, "extra_body": {"ignore_eos": True}}


def words(seed: int, n: int) -> str:
    rng = np.random.default_rng(seed)
    return " ".join("".join(rng.choice(list("abcdefghij"), 4)) for _ in range(n))


PROMPTS = [words(i, 2 + 3 * i) for i in range(32)]  # 9 to 480 bytes: many cross block edges


def complete_all(node: Node, prompts: list[str], **kw) -> list[str]:
    """Greedy completions of all prompts, sent concurrently."""

    async def run() -> list[str]:
        client = node.async_client()
        outs = await asyncio.gather(*[
            client.completions.create(model="tiny", prompt=p, **{**GREEDY, **kw}) for p in prompts
        ])  # fmt: skip
        await client.close()
        return [o.choices[0].text for o in outs]

    return asyncio.run(run())


@pytest.fixture(scope="module")
def alone(node: Node) -> dict[str, str]:
    client = node.client()
    return {p: client.completions.create(model="tiny", prompt=p, **GREEDY).choices[0].text
            for p in PROMPTS}  # fmt: skip


def test_chat_streamed_equals_non_streamed(node: Node):
    client = node.client()
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    full = client.chat.completions.create(model="tiny", messages=msgs, **GREEDY)
    assert full.choices[0].message.role == "assistant"
    assert full.choices[0].finish_reason == "length"
    assert full.usage.completion_tokens == 16 and full.usage.prompt_tokens > 10
    stream = client.chat.completions.create(
        model="tiny", messages=msgs, stream=True, stream_options={"include_usage": True}, **GREEDY
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content and text
    assert chunks[-1].usage.total_tokens == full.usage.total_tokens


def test_completions_streamed_and_logprobs(node: Node):
    client = node.client()
    full = client.completions.create(model="tiny", prompt="hello", logprobs=3, **GREEDY)
    lp = full.choices[0].logprobs
    assert len(lp.tokens) == 16 and all(len(t) == 3 for t in lp.top_logprobs)
    # greedy: the chosen token is the most likely one
    assert all(c == pytest.approx(max(t.values())) for c, t in zip(lp.token_logprobs,
                                                                  lp.top_logprobs))  # fmt: skip
    text = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="hello", stream=True, **GREEDY))  # fmt: skip
    assert text == full.choices[0].text


def test_32_concurrent_requests_match_each_alone(node: Node, alone):
    assert complete_all(node, PROMPTS) == [alone[p] for p in PROMPTS]
    node.wait_blocks_free()


def test_seeded_sampling_and_n(node: Node):
    client = node.client()
    kw = {"model": "tiny", "prompt": "once upon", "max_tokens": 12, "temperature": 1.0,
          "seed": 42}  # fmt: skip
    a = client.completions.create(**kw).choices[0].text
    b = client.completions.create(**kw).choices[0].text
    assert a == b
    many = client.completions.create(**kw, n=4)
    texts = [c.text for c in sorted(many.choices, key=lambda c: c.index)]
    assert texts[0] == a and len(set(texts)) > 1


def test_stop_string_ends_the_choice(node: Node, alone):
    client = node.client()
    p = PROMPTS[5]
    ref = alone[p]
    stop = ref[6:8]
    out = client.completions.create(model="tiny", prompt=p, stop=[stop], **GREEDY).choices[0]
    assert out.finish_reason == "stop"
    assert out.text == ref[: ref.index(stop)]


def test_prefix_cache_hits_show_in_metrics_and_change_nothing(node: Node, alone):
    long = PROMPTS[-1]
    before = node.metric("prefix_cache_hits_tokens")
    client = node.client()
    first = client.completions.create(model="tiny", prompt=long, **GREEDY)
    again = client.completions.create(model="tiny", prompt=long, **GREEDY)
    assert again.choices[0].text == first.choices[0].text == alone[long]
    assert again.usage.prompt_tokens_details.cached_tokens >= 16 * (len(long) // 16 - 1)
    node.wait_blocks_free()  # stats are fresh once the engine is idle
    assert node.metric("prefix_cache_hits_tokens") - before >= 400
    assert node.metric("prefix_cache_hit_rate") > 0


@pytest.mark.parametrize(
    ("flags", "env"),
    [
        (("--no-enable-prefix-caching",), {}),
        (("--max-num-batched-tokens", "16"), {}),  # long prompts in many chunks
        (("--max-model-len", "1024"), {"FD_DISABLE_CHUNKED_PREFILL": "1"}),
        (("--num-gpu-blocks-override", "40", "--max-num-batched-tokens", "64"), {}),  # preempts
    ],
    ids=["no-prefix-cache", "small-budget", "no-chunking", "preemption"],
)
def test_engine_settings_never_change_greedy_output(node_factory, alone, flags, env):
    other = node_factory("--block-size", "16", "--max-num-seqs", "64", *flags, env=env)
    assert complete_all(other, PROMPTS) == [alone[p] for p in PROMPTS]
    other.wait_blocks_free()
    if "40" in flags:
        assert other.metric("num_preemptions") > 0


def test_fastdeploy_module_path_serves(node_factory):
    node = node_factory(entry=("pdserve.entrypoints.openai.api_server",))
    try:
        out = node.client().chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=4,
            extra_body={"ignore_eos": True},  # sampled: eos could otherwise end it early
        )
        assert out.usage.completion_tokens == 4
    finally:
        assert node.stop() == 0  # SIGTERM drains and exits 0


def test_metrics_served_on_both_ports(node: Node):
    status, text = http("GET", node.url + "/metrics")
    assert status == 200 and "pdserve:time_to_first_token_seconds_count" in text
    assert node.metric("kv_total_blocks") == 512


def test_swap_space_tier_serves_evicted_prefixes(node_factory, alone):
    """Overfill the device tier: the long prompt's prefix comes back from --swap-space."""
    small = node_factory("--block-size", "16", "--num-gpu-blocks-override", "40",
                         "--swap-space", "0.01")  # fmt: skip
    client = small.client()
    target = PROMPTS[-1]  # 480 bytes: 30 blocks
    assert (
        client.completions.create(model="tiny", prompt=target, **GREEDY).choices[0].text
        == (alone[target])
    )
    for p in PROMPTS[10:20]:  # 3 to 18 blocks each, 40 in the pool: the target is evicted
        client.completions.create(model="tiny", prompt=p, **GREEDY)
    small.wait_blocks_free()
    assert small.metric("swap_out_blocks") >= 29
    again = client.completions.create(model="tiny", prompt=target, **GREEDY)
    assert again.choices[0].text == alone[target]
    assert again.usage.prompt_tokens_details.cached_tokens >= 16 * 29
    small.wait_blocks_free()
    assert small.metric("swap_in_blocks") >= 29


def test_grpc_standard_health_service(node: Node):
    import grpc

    from pdserve.proto import health_pb2, health_pb2_grpc

    async def check(service: str) -> int:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{node.grpc_port}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            return reply.status

    s = health_pb2.HealthCheckResponse
    assert asyncio.run(check("")) == s.SERVING
    assert asyncio.run(check("pdserve.v1.Node")) == s.SERVING
    assert asyncio.run(check("no.such.Service")) == s.SERVICE_UNKNOWN
