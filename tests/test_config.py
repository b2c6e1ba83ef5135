import pytest

from sparseserve_vllm.config import SparseServeConfig, SparseServeConfigError


def parse(**kw):
    return SparseServeConfig.from_additional_config({"sparseserve": kw})


def test_defaults_and_absent_key():
    cfg = SparseServeConfig.from_additional_config({})
    assert cfg.token_budget == 2048 and cfg.selector == "cuboid_mean" and cfg.working_set_window == 12
    assert cfg.num_select_pages == 2048 // cfg.page_size
    assert SparseServeConfig.from_additional_config(None) == cfg


def test_gqa_reduce_defaults_per_selector_unless_set():
    assert parse().resolved_gqa_reduce == "sum"
    assert parse(selector="quest").resolved_gqa_reduce == "zmax"
    assert parse(selector="mean").resolved_gqa_reduce == "mass"
    assert parse(selector="mean", gqa_reduce="sum").resolved_gqa_reduce == "sum"
    assert parse(selector="quest", gqa_reduce="max").resolved_gqa_reduce == "max"


def test_page_geometry_defaults_per_selector_unless_set():
    """Null page geometry resolves when the config is built: 64-token pages for quest (32 otherwise); sink and recent
    windows of 2 pages, 1 page with pages of 64 tokens or more; a value that is set is kept."""
    geometry = lambda c: (c.page_size, c.sink_pages, c.recent_pages)  # noqa: E731
    assert geometry(parse()) == (32, 2, 2)
    assert geometry(parse(selector="mean")) == (32, 2, 2)
    assert geometry(parse(selector="quest")) == (64, 1, 1)
    assert geometry(parse(selector="quest", page_size=32)) == (32, 2, 2)
    assert geometry(parse(page_size=16)) == (16, 2, 2)
    assert geometry(parse(page_size=128, sink_pages=3)) == (128, 3, 1)
    assert geometry(parse(selector="quest", recent_pages=0)) == (64, 1, 0)
    assert parse(selector="quest").num_select_pages == 32
    with pytest.raises(SparseServeConfigError, match=r"token_budget=32.*>= page_size"):
        parse(selector="quest", token_budget=32)


def test_all_keys_accepted():
    cfg = parse(token_budget=1024, page_size=16, selector="quest", gqa_reduce="max", sink_pages=1, recent_pages=3, dense_layers=2,
                offload=True, host_kv_gib=8, hbm_cache_gib=2.5, working_set_window=4, batch_control=False,
                layer_segmented_prefill=True, max_inject_tokens=4096, stats_interval_s=0)
    assert cfg.page_size == 16 and cfg.offload and cfg.hbm_cache_gib == 2.5 and not cfg.batch_control


@pytest.mark.parametrize(
    "kw, names",
    [
        ({"budget": 100}, ["'budget'", "token_budget"]),
        ({"token_budget": 8}, ["token_budget", ">= page_size"]),
        ({"token_budget": "2k"}, ["token_budget", "int"]),
        ({"token_budget": 2048.0}, ["token_budget", "int"]),
        ({"page_size": 24}, ["page_size", "power of two"]),
        ({"page_size": 512}, ["page_size", "power of two"]),
        ({"page_size": 4}, ["page_size"]),
        ({"selector": "topk"}, ["selector", "cuboid_mean", "quest", "mean"]),
        ({"gqa_reduce": "mean"}, ["gqa_reduce", "sum, max, mass, zmax", "null"]),
        ({"gqa_reduce": 1}, ["gqa_reduce", "str or null"]),
        ({"sink_pages": -1}, ["sink_pages", ">= 0"]),
        ({"recent_pages": -2}, ["recent_pages", ">= 0"]),
        ({"dense_layers": -1}, ["dense_layers", ">= 0"]),
        ({"sink_pages": 40, "recent_pages": 30}, ["sink_pages", "recent_pages", "64 pages"]),
        ({"offload": "yes"}, ["offload", "bool"]),
        ({"offload": True}, ["host_kv_gib", "required"]),
        ({"offload": True, "host_kv_gib": 4}, ["hbm_cache_gib", "required"]),
        ({"offload": True, "host_kv_gib": -4, "hbm_cache_gib": 1}, ["host_kv_gib", "> 0"]),
        ({"offload": True, "host_kv_gib": 4, "hbm_cache_gib": 0}, ["hbm_cache_gib", "> 0"]),
        ({"hbm_cache_gib": 1.0}, ["hbm_cache_gib", "offload"]),
        ({"working_set_window": 0}, ["working_set_window", ">= 1"]),
        ({"batch_control": False}, ["batch_control", "offload"]),
        ({"batch_control": 0}, ["batch_control", "bool"]),
        ({"max_inject_tokens": 0}, ["max_inject_tokens", ">= 1"]),
        ({"max_inject_tokens": 4096}, ["max_inject_tokens", "offload=true"]),
        ({"offload": True, "host_kv_gib": 4, "hbm_cache_gib": 1, "layer_segmented_prefill": False,
          "max_inject_tokens": 4096}, ["max_inject_tokens", "layer_segmented_prefill not false"]),
        ({"layer_segmented_prefill": True}, ["layer_segmented_prefill", "offload=true"]),
        ({"layer_segmented_prefill": "on"}, ["layer_segmented_prefill", "bool or null"]),
        ({"stats_interval_s": -1}, ["stats_interval_s", ">= 0"]),
        ({"selector": None}, ["selector", "str"]),
    ],
)
def test_invalid_values_name_the_setting_and_what_is_allowed(kw, names):
    with pytest.raises(SparseServeConfigError) as e:
        parse(**kw)
    for n in names:
        assert n in str(e.value), (n, str(e.value))


def test_section_must_be_an_object():
    with pytest.raises(SparseServeConfigError, match="JSON object"):
        SparseServeConfig.from_additional_config({"sparseserve": [1, 2]})


def test_geometry_checks():
    cfg = parse(page_size=64)
    cfg.validate_against(block_size=128, num_layers=4)
    with pytest.raises(SparseServeConfigError, match="page_size .*64.* block size .*16"):
        cfg.validate_against(block_size=16)
    with pytest.raises(SparseServeConfigError, match=r"page_size \(64\) .* block size \(32\).*default: .*quest 64"):
        parse(selector="quest").validate_against(block_size=32)
    with pytest.raises(SparseServeConfigError, match="dense_layers .*0..4"):
        parse(dense_layers=5).validate_against(block_size=None, num_layers=4)
