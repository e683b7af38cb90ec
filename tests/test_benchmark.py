"""The benchmark command runs end to end on a tiny config and writes well-formed output."""

import json

import pytest

from mvar import benchmark
from mvar.attention import natten_available


def test_benchmark_writes_json_and_charts(tmp_path):
    benchmark.main(["--presets", "tiny", "--batch-sizes", "1", "--memory-batch-sizes", "1", "2", "--dtypes", "fp32",
                    "--repeats", "1", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "benchmark.json").read_text())
    assert report["matmul_peak_flops"]["fp32"] > 0
    entry, memory_only = report["configs"]
    assert entry["preset"] == "tiny" and entry["batch"] == 1
    assert memory_only["batch"] == 2 and set(memory_only["modes"]["VAR"]) == {"analytic", "peak_memory"}
    var, mvar = entry["modes"]["VAR"], entry["modes"]["MVAR"]
    assert var["kv_cache_bytes_allocated"] == var["analytic"]["kv_cache_bytes"] > 0
    assert mvar["kv_cache_bytes_allocated"] == mvar["analytic"]["kv_cache_bytes"] == 0
    assert abs(var["flops_error"]) < 0.02 and abs(mvar["flops_error"]) < 0.02
    for mode in (var, mvar):
        assert len(mode["latency_per_scale"]) == 10 and mode["latency_total"]["median"] > 0
        assert mode["peak_memory"]["peak_bytes"] > 0 and "fresh subprocess" in mode["peak_memory"]["measure"]
        assert mode["train"]["average_step_seconds"] > 0
        assert mode["page_total"]["median"] > 0 and mode["page_previews"]["median"] > 0 and mode["page_ratio"] > 0
        assert all(scales[-1] == 10 for scales in mode["page_streamed_scales"])  # the last scale is the final image
        fidelity = mode["preview_fidelity"]
        assert len(fidelity["psnr"]) == 10 and min(fidelity["psnr"]) >= 30 and fidelity["decode_seconds"] > 0
        assert mode["train_peak_memory"]["peak_bytes"] > 0 and mode["train_peak_memory"]["job"]["task"] == "train"
    assert set(mvar["train"]["per_kind"]) == {"0-7", "8-8", "9-9"} and set(var["train"]["per_kind"]) == {"0-9"}
    assert [k["weight"] for k in mvar["train"]["per_kind"].values()] == [8, 1, 1]
    assert any("random weights" in note for note in report["notes"])
    summary = (tmp_path / "summary.md").read_text().splitlines()
    assert summary[0].startswith("| preset |") and summary[2].startswith("| tiny | 1 | fp32 | ")
    assert summary[3].startswith("| tiny | 2 | fp32 |  |  | ")  # memory only at batch 2
    for chart in ("memory_vs_batch.html", "latency_per_scale.html"):
        assert "plotly" in (tmp_path / chart).read_text().lower()


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile", "ignore:return_lse")
def test_timing_table_has_a_column_per_backend():
    rows = benchmark.time_attention(sides=(8, 9), batch=1, heads=2, head_dim=8, repeats=1, natten_max_tokens=64)
    assert [(row["grid"], row["dtype"]) for row in rows] == [
        ("8x8", "float32"), ("8x8", "bfloat16"), ("9x9", "float32"), ("9x9", "bfloat16")]
    backends = ("dense", "gather", "natten") if natten_available() else ("dense", "gather")
    assert benchmark.attention_backends() == backends
    for row in rows:
        timed = backends if row["grid"] == "8x8" else ("dense", "gather")  # natten only up to 64 tokens
        assert set(row) == {"grid", "dtype", *timed}
        assert all(0 < row[name][1] <= row[name][0] for name in timed)  # min <= median
    header, *lines = benchmark.attention_table(rows)
    assert header.split() == ["grid", "dtype", *backends, *(f"{b}/gather" for b in backends if b != "gather")]
    assert [line.split()[:2] for line in lines] == [["8x8", "float32"], ["8x8", "bfloat16"],
                                                    ["9x9", "float32"], ["9x9", "bfloat16"]]
    if natten_available():
        assert lines[2].split()[-1] == "-" and "-" not in lines[0].split()
    with pytest.raises(ValueError, match="backends"):
        benchmark.time_attention(sides=(8,), backends=("flash",))


def test_the_attention_table_runs_alone_without_models(tmp_path, monkeypatch, capsys):
    rows = [{"grid": "8x8", "dtype": "float32", "dense": (2.0, 1.0), "gather": (1.0, 0.5)}]
    monkeypatch.setattr(benchmark, "time_attention", lambda: rows)
    benchmark.main(["--measure", "attention", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "benchmark.json").read_text())
    assert report["attention"] == [{"grid": "8x8", "dtype": "float32", "dense": [2.0, 1.0], "gather": [1.0, 0.5]}]
    assert report["configs"] == [] and "matmul_peak_flops" not in report
    assert "dense/gather" in capsys.readouterr().out
