"""The benchmark command runs end to end on a tiny config and writes well-formed output."""

import json

from mvar import benchmark


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
        assert mode["train_peak_memory"]["peak_bytes"] > 0 and mode["train_peak_memory"]["job"]["task"] == "train"
    assert set(mvar["train"]["per_kind"]) == {"0-7", "8-8", "9-9"} and set(var["train"]["per_kind"]) == {"0-9"}
    assert [k["weight"] for k in mvar["train"]["per_kind"].values()] == [8, 1, 1]
    assert any("random weights" in note for note in report["notes"])
    summary = (tmp_path / "summary.md").read_text().splitlines()
    assert summary[0].startswith("| preset |") and summary[2].startswith("| tiny | 1 | fp32 | ")
    assert summary[3].startswith("| tiny | 2 | fp32 |  |  | ")  # memory only at batch 2
    for chart in ("memory_vs_batch.html", "latency_per_scale.html"):
        assert "plotly" in (tmp_path / chart).read_text().lower()
