from __future__ import annotations

import multiprocessing
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from pdserve.kvtransfer.shm_pool import MAX_NAME_CHARS, SharedKVPool, host_id, pool_name
from tests.kvtransfer.conftest import unique_shm_name
from tests.kvtransfer.peer import attach_and_write

SHAPE = (2, 2, 3, 4, 2, 8)


def test_pool_name() -> None:
    names = {
        pool_name(p, port)
        for p in ("node-a", "node-b", "x" * 200, "a/b c")
        for port in (8003, 8004)
    }
    assert len(names) == 8
    for n in names:
        assert len(n) <= MAX_NAME_CHARS and re.fullmatch(r"[A-Za-z0-9_.-]+", n), n
    assert pool_name("node-a", 8003) == "pdkv_node-a_8003"
    assert pool_name("x" * 200, 8003) == pool_name("x" * 200, 8003)
    with pytest.raises(ValueError, match="port"):
        pool_name("a", 70000)


def test_create_attach_share_memory() -> None:
    with SharedKVPool.create(unique_shm_name(), SHAPE) as owner:
        assert owner.array.shape == SHAPE and owner.array.dtype == np.float32
        assert not owner.array.any()
        peer = SharedKVPool.attach(owner.name, SHAPE, "float32")
        peer.array[1, 0, 2] = 5.0
        assert (owner.array[1, 0, 2] == 5.0).all() and owner.array.sum() == 5.0 * 64
        with pytest.raises(RuntimeError, match="owner"):
            peer.unlink()
        peer.close()
        for wrong in ((3, *SHAPE[1:]), (1, *SHAPE[1:]), SHAPE[:-1]):
            with pytest.raises(ValueError, match="bytes"):
                SharedKVPool.attach(owner.name, wrong, np.float32)
        name = owner.name
    with pytest.raises(FileNotFoundError):
        SharedKVPool.attach(name, SHAPE)


def test_create_replaces_leftover() -> None:
    name = unique_shm_name()
    first = SharedKVPool.create(name, SHAPE)
    with pytest.raises(FileExistsError):
        SharedKVPool.create(name, SHAPE)
    with SharedKVPool.create(name, SHAPE, replace=True) as second:
        assert not first.is_current() and second.is_current()
    first.close()


def _child_attaches(method: str, name: str) -> str:
    if method == "spawn":
        mp = multiprocessing.get_context("spawn")
        with mp.Pool(1) as p:
            return p.apply(attach_and_write, (name, SHAPE, 3.0))
    code = (
        f"from tests.kvtransfer.peer import attach_and_write; "
        f"print(attach_and_write({name!r}, {SHAPE!r}, 3.0))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=os.getcwd(),
        check=True,
    )
    assert "leaked" not in done.stderr and "Traceback" not in done.stderr, done.stderr
    return done.stdout.strip()


@pytest.mark.parametrize("method", ["spawn", "subprocess"])
def test_attacher_exit_keeps_owners_segment(method: str) -> None:
    owner = SharedKVPool.create(unique_shm_name(), SHAPE)
    try:
        child_host = _child_attaches(method, owner.name)
        assert child_host == host_id()
        assert (owner.array == 3.0).all()
        again = SharedKVPool.attach(owner.name, SHAPE)  # the name survived the child's exit
        assert again.is_current() and (again.array == 3.0).all()
        again.close()
    finally:
        owner.close()
        owner.unlink()


def test_host_id_is_stable() -> None:
    assert host_id() == host_id() and len(host_id()) == 16
