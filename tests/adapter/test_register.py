"""The general plugin against real vLLM 0.26: registration, the `sparseserve` name, config validation at startup."""

import importlib.metadata as md

import pytest
import vllm
from vllm.engine.arg_utils import EngineArgs
from vllm.v1.attention.backends.registry import AttentionBackendEnum

import sparseserve_vllm
from sparseserve_vllm.config import SparseServeConfigError
from sparseserve_vllm.version_check import UnsupportedVLLMVersion


def test_entry_points_are_installed():
    general = {e.name: e.value for e in md.entry_points(group="vllm.general_plugins")}
    platform = {e.name: e.value for e in md.entry_points(group="vllm.platform_plugins")}
    assert general["sparseserve"] == "sparseserve_vllm:register"
    assert platform["sparseserve_cpu"] == "sparseserve_vllm.platform:cpu_platform_plugin"


def test_register_is_idempotent_and_names_the_custom_slot():
    sparseserve_vllm.register()
    sparseserve_vllm.register()
    assert AttentionBackendEnum["SPARSESERVE"] is AttentionBackendEnum.CUSTOM
    assert AttentionBackendEnum.CUSTOM.get_path() == sparseserve_vllm.BACKEND_PATH
    from vllm.platforms import current_platform

    assert type(current_platform).__name__ == "SparseServeCpuPlatform"
    assert current_platform.is_cpu()


def test_wrong_vllm_version_is_refused(monkeypatch):
    monkeypatch.setattr(sparseserve_vllm, "_registered", False)
    monkeypatch.setattr(vllm, "__version__", "0.27.1")
    with pytest.raises(UnsupportedVLLMVersion, match=r"supports vLLM 0\.26\.x only.*vLLM 0\.27\.1 is installed"):
        sparseserve_vllm.register()


def config_for(model, **kw):
    args = dict(model=model, attention_backend="sparseserve", dtype="float32", max_model_len=2048)
    args.update(kw)
    return EngineArgs(**args).create_engine_config()


def test_engine_config_selects_the_backend_by_name(tiny_model):
    cfg = config_for(tiny_model(), additional_config={"sparseserve": {"token_budget": 1024}})
    assert cfg.attention_config.backend == AttentionBackendEnum.CUSTOM


@pytest.mark.parametrize(
    "section, match",
    [
        ({"token_budgte": 1}, "unknown setting.*'token_budgte'.*allowed"),
        ({"selector": "best"}, "selector.*cuboid_mean, quest, mean"),
        ({"page_size": 256}, r"page_size \(256\) must divide vLLM's KV block size \(128\)"),
        ({"dense_layers": 3}, r"dense_layers \(3\).*0..2"),
        ({"max_inject_tokens": 4096}, "max_inject_tokens sizes layer-segmented prefill.*offload=true"),
    ],
)
def test_bad_settings_stop_startup_in_the_users_process(tiny_model, section, match):
    kw = {"block_size": 128} if "page_size" in section else {}
    with pytest.raises(SparseServeConfigError, match=match):
        config_for(tiny_model(), additional_config={"sparseserve": section}, **kw)


def test_a_context_beyond_the_selectable_pages_is_refused(tiny_model, monkeypatch):
    monkeypatch.setenv("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")
    with pytest.raises(SparseServeConfigError, match=r"max_model_len=131080 is more than 16384 pages of page_size=8.*"
                                                     r"allowed: max_model_len <= 131072"):
        config_for(tiny_model(), additional_config={"sparseserve": {"page_size": 8, "token_budget": 256}},
                   max_model_len=131080)


def test_layer_segmented_prefill_is_refused_for_an_architecture_it_does_not_run(tiny_model):
    section = {"offload": True, "host_kv_gib": 0.1, "hbm_cache_gib": 0.01, "layer_segmented_prefill": True}
    with pytest.raises(SparseServeConfigError, match="layer_segmented_prefill supports the architectures "
                                                     "LlamaForCausalLM, Qwen2ForCausalLM; this model is GemmaForCausalLM"):
        config_for(tiny_model("gemma"), additional_config={"sparseserve": section})
    # null (the default) turns it off for such a model, and on for a Llama.
    from sparseserve_vllm.adapter.config_access import segmented_prefill_on

    del section["layer_segmented_prefill"]
    assert not segmented_prefill_on(config_for(tiny_model("gemma"), additional_config={"sparseserve": section}))
    assert segmented_prefill_on(config_for(tiny_model("llama"), additional_config={"sparseserve": section}))


def test_settings_without_the_backend_are_refused(tiny_model):
    with pytest.raises(SparseServeConfigError, match="--attention-backend sparseserve"):
        config_for(tiny_model(), attention_backend=None, additional_config={"sparseserve": {}})


OFFLOAD = {"sparseserve": {"offload": True, "host_kv_gib": 1, "hbm_cache_gib": 0.1}}


def test_offload_configures_its_connector_and_turns_prefix_caching_off(tiny_model):
    cfg = config_for(tiny_model(), additional_config=OFFLOAD)
    assert cfg.kv_transfer_config.kv_connector == "SparseServeConnector"
    assert cfg.kv_transfer_config.kv_connector_module_path == "sparseserve_vllm.adapter.connector"
    assert cfg.cache_config.enable_prefix_caching is False


@pytest.mark.parametrize(
    "extra, match",
    [
        ({"enable_prefix_caching": True}, "prefix caching.*--enable-prefix-caching"),
        ({"kv_transfer_config": {"kv_connector": "OffloadingConnector", "kv_role": "kv_both"}},
         "own KV connector.*OffloadingConnector"),
        ({"kv_offloading_size": 4.0}, "--kv-offloading-size"),
        ({"pipeline_parallel_size": 2}, r"does not support pipeline parallelism.*allowed: 1"),
        ({"additional_config": {"sparseserve": {"offload": True, "host_kv_gib": 100000, "hbm_cache_gib": 0.1}}},
         "host_kv_gib=100000 is more than this host can pin; allowed: <= "),
    ],
)
def test_offload_conflicts_are_refused(tiny_model, extra, match):
    from vllm.config import KVTransferConfig

    if "kv_transfer_config" in extra:
        extra = {"kv_transfer_config": KVTransferConfig(**extra["kv_transfer_config"])}
    extra.setdefault("additional_config", OFFLOAD)
    with pytest.raises(SparseServeConfigError, match=match):
        config_for(tiny_model(), **extra)


def test_a_model_with_sliding_window_attention_is_refused(tiny_model, tmp_path):
    import json
    import shutil

    src = tiny_model("qwen2")
    shutil.copytree(src, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg.update(use_sliding_window=True, sliding_window=256, max_window_layers=0)
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SparseServeConfigError, match="sliding-window attention.*another --attention-backend"):
        config_for(str(tmp_path / "m"))
