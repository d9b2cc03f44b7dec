"""CUDA-graph flags: FastDeploy's --graph-optimization-config JSON and --use-cudagraph."""

from __future__ import annotations

import pytest

from pdserve.backends.numpy_ops import NumpyOps
from pdserve.engine.engine_core import graph_sizes
from pdserve.engine_config import EngineConfig, default_capture_sizes


def test_default_capture_ladder_pads_by_at_most_15_rows():
    assert default_capture_sizes(128) == [1, 2, 4, 8, 16, 32, 48, 64, 80, 96, 112, 128]
    assert default_capture_sizes(6) == [1, 2, 4, 6]
    assert default_capture_sizes(40) == [1, 2, 4, 8, 16, 32, 40]


def test_graphs_default_on_and_bounded_by_max_num_seqs():
    assert EngineConfig().cudagraph_capture_sizes(128) == [1, 2, 4, 8]  # --max-num-seqs 8
    assert EngineConfig(max_num_seqs=256).cudagraph_capture_sizes(128)[-1] == 128
    assert EngineConfig(max_num_seqs=20).cudagraph_capture_sizes(128) == [1, 2, 4, 8, 16, 20]


def test_graph_optimization_config_sets_sizes_or_turns_graphs_off():
    sizes = EngineConfig(graph_optimization_config='{"cudagraph_capture_sizes": [4, 1, 300]}',
                         max_num_seqs=256)  # fmt: skip
    assert sizes.cudagraph_capture_sizes(128) == [1, 4]  # 300 > --max-num-seqs
    capped = EngineConfig(graph_optimization_config='{"max_capture_batch_size": 32}',
                          max_num_seqs=64)  # fmt: skip
    assert capped.cudagraph_capture_sizes(128) == [1, 2, 4, 8, 16, 32]
    off = EngineConfig(graph_optimization_config='{"use_cudagraph": false, "graph_opt_level": 0}')
    assert off.cudagraph_capture_sizes(128) == []


@pytest.mark.parametrize(
    "text,message",
    [
        ("{", "not valid JSON"),
        ("[1]", "expected a JSON object"),
        ('{"cuda_graph": true}', "unknown key 'cuda_graph'"),
        ('{"use_cudagraph": 1}', "use_cudagraph must be a bool"),
        ('{"cudagraph_capture_sizes": [0]}', "ints in [1, 4096]"),
        ('{"max_capture_batch_size": true}', "must be a int"),
        ('{"graph_opt_level": 1}', "not implemented"),
    ],
)
def test_bad_graph_optimization_config_names_the_flag(text, message):
    with pytest.raises(ValueError, match="--graph-optimization-config") as e:
        EngineConfig(graph_optimization_config=text)
    assert message in str(e.value)


def test_numpy_backend_has_no_graphs_and_refuses_use_cudagraph():
    assert graph_sizes(EngineConfig(backend="numpy"), NumpyOps()) == []
    with pytest.raises(ValueError, match="--use-cudagraph"):
        graph_sizes(EngineConfig(backend="numpy", use_cudagraph=True), NumpyOps())
