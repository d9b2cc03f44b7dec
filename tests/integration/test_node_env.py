"""FastDeploy's environment variables on a real node: FD_LOG_DIR, INFERENCE_MSG_QUEUE_ID."""

from __future__ import annotations

import glob
import os


def test_fd_log_dir_gets_node_and_engine_logs(tmp_path, node_factory):
    node = node_factory(env={"FD_LOG_DIR": str(tmp_path / "logs")})
    node.client().completions.create(model="tiny", prompt="hi", max_tokens=2)
    assert node.stop() == 0
    node_log = (tmp_path / "logs" / "node.log").read_text()
    engine_log = (tmp_path / "logs" / "engine.log").read_text()
    assert "serving tiny as mixed on http://127.0.0.1" in node_log
    assert "POST /v1/completions" in node_log
    assert "node stopped (exit code 0)" in node_log
    assert engine_log  # the engine process logs to its own file


def test_two_nodes_with_one_queue_id_do_not_collide(tmp_path, node_factory):
    env = {"INFERENCE_MSG_QUEUE_ID": "7", "PDSERVE_IPC_DIR": str(tmp_path)}
    a, b = node_factory(env=env), node_factory(env=env)
    try:
        sockets = glob.glob(str(tmp_path / "pdserve-7-*"))
        assert len(sockets) == 4  # two per node, all named after the queue id
        for n in (a, b):
            out = n.client().completions.create(
                model="tiny", prompt="x", max_tokens=3, extra_body={"ignore_eos": True}
            )
            assert out.usage.completion_tokens == 3
    finally:
        assert a.stop() == 0 and b.stop() == 0
    assert not glob.glob(str(tmp_path / "pdserve-7-*")), "ipc sockets left behind"
    assert not os.listdir(tmp_path)
