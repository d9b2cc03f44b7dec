"""PDSERVE_KV_FAULT: dropped or corrupted layer frames always fail their transfer, never land
as silently wrong KV; with no faults every transfer completes."""

from __future__ import annotations

import numpy as np
import pytest

from pdserve.kvtransfer import KVReceiver, KVSender
from pdserve.kvtransfer.faults import FaultInjector
from tests.kvtransfer.conftest import DST_IDS, SRC_IDS, DestPool, make_source, pump, send_all

TRANSFERS = 24


def run_transfers(ctx, rx: KVReceiver, dest: DestPool) -> list[tuple[bool, bool, str]]:
    """(acked ok, faults injected, error) of each of TRANSFERS sequential transfers; checks
    that an ok transfer landed exactly its bytes."""
    tx = KVSender(ctx)
    assert tx.faults is not None
    out = []
    try:
        for i in range(TRANSFERS):
            src = make_source(seed=100 + i)
            faults = tx.faults.dropped + tx.faults.corrupted
            rx.expect(f"f{i}", DST_IDS, num_layers=4)
            tx.start(f"f{i}", dest.destination(rx.endpoint, checksum=True))
            send_all(tx, f"f{i}", src)
            (res,), (ack,) = pump(rx, tx, results=1, acks=1)
            assert res.ok == ack.ok
            if res.ok:
                np.testing.assert_array_equal(dest.kv[:, :, DST_IDS], src[:, :, SRC_IDS])
            out.append((res.ok, tx.faults.dropped + tx.faults.corrupted > faults, res.error))
    finally:
        tx.close()
    return out


def test_faults_never_pass_silently(ctx, rx, dest, monkeypatch) -> None:
    monkeypatch.setenv("PDSERVE_KV_FAULT", "drop=0.15,corrupt=0.15,seed=3")
    runs = run_transfers(ctx, rx, dest)
    assert all(ok != faulty for ok, faulty, _ in runs), runs
    errors = " ".join(err for ok, _, err in runs if not ok)
    assert "checksum" in errors and "incomplete" in errors
    assert any(ok for ok, _, _ in runs)


def test_no_faults_all_complete(ctx, rx, dest, monkeypatch) -> None:
    monkeypatch.setenv("PDSERVE_KV_FAULT", "drop=0,corrupt=0,seed=1")
    assert all(ok for ok, _, _ in run_transfers(ctx, rx, dest))
    assert rx.frames_rejected == 0


@pytest.mark.parametrize(
    "spec", ["drop=2", "drop=0.6,corrupt=0.6", "drop", "lose=0.1", "drop=x", "drop=0.1,drop=0.2"]
)
def test_bad_spec(spec: str, monkeypatch) -> None:
    monkeypatch.setenv("PDSERVE_KV_FAULT", spec)
    with pytest.raises(ValueError, match="PDSERVE_KV_FAULT"):
        FaultInjector.from_env()


def test_off_by_default(monkeypatch) -> None:
    monkeypatch.delenv("PDSERVE_KV_FAULT", raising=False)
    assert FaultInjector.from_env() is None
