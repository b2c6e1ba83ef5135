import pytest

from sparseserve_vllm.version_check import UnsupportedVLLMVersion, check_vllm_version


@pytest.mark.parametrize("version", ["0.26.0", "0.26.0+cpu", "0.26.3", "0.26.1+cu130"])
def test_supported_versions_pass(version):
    check_vllm_version(version)


@pytest.mark.parametrize("version", ["0.25.2", "0.27.0", "1.26.0", "0.2.6", "0.260.0"])
def test_other_versions_are_refused_with_the_supported_one_named(version):
    with pytest.raises(UnsupportedVLLMVersion) as e:
        check_vllm_version(version)
    assert version in str(e.value) and "0.26" in str(e.value)
