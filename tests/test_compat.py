"""The supported vLLM versions and the version-specific pieces of ``vllm_sepllm.compat``."""

import subprocess
import sys

import pytest
import torch

from vllm_sepllm import compat


def test_installed_version_is_supported():
    assert compat.VLLM_VERSION in compat.SUPPORTED_VLLM
    compat.check_vllm()


@pytest.mark.parametrize("version", ["0.25.0", "0.27.0", "0.31.2", "0.33.1", "0.34.0", "1.0.0"])
def test_other_versions_refused_in_one_line(version):
    with pytest.raises(compat.UnsupportedVLLMError) as e:
        compat.check_vllm(version)
    message = str(e.value)
    assert "\n" not in message and f"this is vLLM {version}" in message
    assert all(v in message for v in ("0.26.0", "0.33.0", "0.32.0")), message


@pytest.mark.parametrize("version", ["0.26.0", "0.32.0+cpu", "0.33.0"])
def test_supported_versions_accepted(version):
    compat.check_vllm(version)


def test_plugin_load_refuses_an_unsupported_vllm():
    """vLLM loads the plugin at start-up in every process: an unsupported release stops there
    with the one-line error, before anything is patched."""
    code = ("import vllm; vllm.__version__ = '0.30.1'\n"
            "import vllm_sepllm, vllm_sepllm.patches as p\n"
            "try:\n    vllm_sepllm.register()\n"
            "except Exception as e:\n    print(type(e).__name__, '|', e, '|', p._installed)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    line = out.stdout.strip().splitlines()[-1]
    name, message, installed = line.split(" | ")
    assert name == "UnsupportedVLLMError" and installed == "False"
    assert message.startswith("vllm-sepllm supports vLLM 0.26.0 or 0.33.0") and "0.30.1" in message


def test_slot_major_view():
    """0.32+: vLLM hands each layer the logical [B, H, N, C] view of an LBNHC allocation
    (physically [B, N, H, C]); ``slot_major`` must give the physical tensor back, as a view.
    0.26: the backend's own shape [B, N, H, C] is passed through unchanged."""
    blocks, block_size, heads, c = 3, 16, 2, 8
    physical = torch.arange(blocks * block_size * heads * c, dtype=torch.float32).view(
        blocks, block_size, heads, c)
    if compat.NEW_API:
        logical = physical.permute(0, 2, 1, 3)  # what create_kv_cache_views returns for LBNHC
        out = compat.slot_major(logical)
        assert out.shape == physical.shape and out.data_ptr() == physical.data_ptr()
        assert torch.equal(out, physical) and out.is_contiguous()
        with pytest.raises(RuntimeError, match="LBNHC"):  # another layout is refused
            compat.slot_major(physical.permute(0, 2, 1, 3).contiguous())
        from vllm.v1.kv_cache_layout import KVCacheLayout

        assert compat.kv_cache_layouts() == (KVCacheLayout.LBNHC,)
    else:
        assert compat.slot_major(physical) is physical
        assert compat.kv_cache_layouts() is None


def test_backend_declares_its_layout_and_block_sizes():
    from vllm_sepllm.backend import SepLLMBackend

    assert SepLLMBackend.supported_kv_cache_layouts() == compat.kv_cache_layouts()
    def bases(sizes):
        return [getattr(s, "base", s) for s in sizes]

    # 0.32+ passes the layer's spec
    assert bases(SepLLMBackend.get_supported_kernel_block_sizes()) == [16]
    assert bases(SepLLMBackend.get_supported_kernel_block_sizes(None)) == [16]
