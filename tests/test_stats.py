import os

from sparseserve_vllm import stats


def test_publish_and_sum_across_processes(tmp_path):
    a, b = stats.Counters(), stats.Counters()
    a.add("pages_scored", 10)
    a.add("decode_steps", 2)
    (tmp_path / "99999999.json").write_text('{"pages_scored": 5, "tokens_attended": 7, "hbm_pages_in_use": 9}')
    a.values["hbm_pages_in_use"] = 4
    stats.publish(a, tmp_path)
    (tmp_path / "garbage.json").write_text("{not json")
    totals = stats.read_totals(tmp_path)
    assert totals["pages_scored"] == 15 and totals["decode_steps"] == 2 and totals["tokens_attended"] == 7
    # A gauge of a process that is gone (pid 99999999) no longer counts; this live process's does.
    assert totals["hbm_pages_in_use"] == 4
    assert (tmp_path / f"{os.getpid()}.json").exists()
    b.add("pages_selected", 3)
    assert "selected=0" in stats.format_line(stats.read_totals(tmp_path / "missing"))
    assert "pages scored=15" in stats.format_line(totals)


def test_stats_dir_is_created_once_and_exported(monkeypatch, tmp_path):
    monkeypatch.delenv(stats.ENV_DIR, raising=False)
    d = stats.ensure_stats_dir()
    assert d.is_dir() and os.environ[stats.ENV_DIR] == str(d)
    assert stats.ensure_stats_dir() == d
