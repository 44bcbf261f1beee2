"""A look inside chosen steps: log.profile_steps writes a trace Perfetto and TensorBoard open and a table of
the top operators; log.memory_snapshot is GPU-only and says so on a CPU."""

import json

from conftest import in_process, train

from train.__main__ import main as train_main


def test_a_profiled_window_writes_a_trace_and_the_top_operators(data_dir, tmp_path):
    rows = train(data_dir, tmp_path, "--log.profile_steps=[2,3]", "--log.memory_snapshot=true", steps=4)
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    folder = tmp_path / "profile"
    traces = list(folder.glob("rank0.*.pt.trace.json"))
    assert len(traces) == 1
    events = json.loads(traces[0].read_text())["traceEvents"]
    assert any("aten::mm" in event.get("name", "") for event in events)  # the steps' operators are in it
    table = (folder / "top_ops_rank0.txt").read_text()
    assert table.startswith("steps 2-3 (2), rank 0") and "aten::" in table
    assert not list(folder.glob("memory_snapshot_*"))  # CUDA only


def test_a_window_out_of_order_or_a_snapshot_without_one_is_one_line(data_dir, tmp_path):
    for flags, part in (
        (["--log.profile_steps=[3,2]"], "log.profile_steps"),
        (["--log.memory_snapshot=true"], "log.memory_snapshot"),
    ):
        result = in_process(train_main, "--config", "configs/tiny.toml", f"--data.path={data_dir}", *flags)
        assert result.returncode == 2 and part in result.stderr.strip().splitlines()[-1], result.stderr


def test_the_plot_shows_each_layers_busiest_expert_over_the_run(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from toolbox.plot import expert_heatmap

    rows = [{"tokens_seen": 1e6 * step, "expert_load_max": [1.0 + step, 2.0, 3.0]} for step in range(1, 5)]
    figure, (heatmap, dense) = plt.subplots(1, 2)
    expert_heatmap(figure, heatmap, tmp_path, rows)
    expert_heatmap(figure, dense, tmp_path, [{"tokens_seen": 1.0, "loss": 2.0}])
    (image,) = heatmap.images
    assert image.get_array().shape == (3, 4)  # layers x logged steps
    assert image.get_array()[0].tolist() == [2.0, 3.0, 4.0, 5.0] and not dense.axison
    plt.close(figure)
