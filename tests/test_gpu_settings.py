"""The GPU settings (tensor parallelism, memory share, max model length, dtype, eager mode, head-input source) are
first-class server settings: the GPU image and the Kubernetes manifests set them as ``SDM_*`` variables that the
server accepts, and ``deploy/gpu/smoke.sh`` is valid bash whose flags all exist in ``server/config.py``."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import yaml
from test_deploy_support import DEPLOY, ROOT, parse_dockerfile

SMOKE = DEPLOY / "gpu" / "smoke.sh"
GPU_SETTINGS = (
    "SDM_DTYPE",
    "SDM_VLLM_TENSOR_PARALLEL_SIZE",
    "SDM_VLLM_GPU_MEMORY_UTILIZATION",
    "SDM_VLLM_MAX_MODEL_LEN",
    "SDM_VLLM_MAX_NUM_SEQS",
    "SDM_VLLM_ENFORCE_EAGER",
    "SDM_VLLM_HIDDEN_STATES",
)


def _config_from(environ: dict[str, str], bundle: Path):
    from server.config import ServerConfig

    return ServerConfig.from_sources([], {**environ, "SDM_BUNDLE": str(bundle)})


def test_gpu_settings_are_flags_and_variables(fake_bundle: Path) -> None:
    from server.config import build_parser

    help_text = build_parser().format_help()
    for variable in GPU_SETTINGS:
        flag = "--" + variable[len("SDM_") :].lower().replace("_", "-")
        assert flag in help_text and variable in help_text, variable
    config = _config_from(
        {"SDM_VLLM_ENFORCE_EAGER": "1", "SDM_VLLM_TENSOR_PARALLEL_SIZE": "4", "SDM_VLLM_MAX_NUM_SEQS": "64"},
        fake_bundle,
    )
    assert config.vllm_settings()["engine_args"] == {
        "enforce_eager": True,
        "tensor_parallel_size": 4,
        "max_num_seqs": 64,
    }


def test_gpu_image_sets_every_gpu_setting_to_a_value_the_server_accepts(fake_bundle: Path) -> None:
    env = parse_dockerfile(ROOT / "Dockerfile").env
    missing = [v for v in GPU_SETTINGS if v not in env]
    assert not missing, f"the GPU Dockerfile does not set {missing}"
    config = _config_from({v: env[v] for v in GPU_SETTINGS}, fake_bundle)
    assert config.vllm_settings() == {"max_model_len": None, "engine_args": {}, "head_input": "auto"}, (
        "the image defaults are vLLM's own"
    )


def test_k8s_sets_the_gpu_settings_and_requests_one_gpu_per_tensor_parallel_rank(fake_bundle: Path) -> None:
    docs = [d for p in sorted((DEPLOY / "k8s").glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]
    data = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    missing = [v for v in GPU_SETTINGS if v not in data]
    assert not missing, f"deploy/k8s/configmap.yaml does not set {missing}"
    config = _config_from({v: str(data[v]) for v in GPU_SETTINGS}, fake_bundle)
    container = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == config.vllm_tensor_parallel_size
    assert 0 < config.vllm_gpu_memory_utilization < 1


def test_smoke_script_is_valid_bash() -> None:
    bash = shutil.which("bash")
    assert bash is not None
    result = subprocess.run([bash, "-n", str(SMOKE)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def test_smoke_script_uses_only_existing_flags_and_variables() -> None:
    from server.config import ServerConfig, env_name

    text = SMOKE.read_text()
    fields = set(ServerConfig.__dataclass_fields__)
    flags_block = re.search(r"^flags = \{(.*?)^\}", text, re.DOTALL | re.MULTILINE)
    assert flags_block is not None, "smoke.sh's server flags dict moved; update this test"
    keys = re.findall(r'^\s+"(\w+)":', flags_block.group(1), re.MULTILINE)
    assert {"bundle", "backend", "device"} <= set(keys)
    vllm_block = re.search(r"^    flags\.update\((.*?)^    \)", text, re.DOTALL | re.MULTILINE)
    assert vllm_block is not None, "smoke.sh's vLLM flags moved; update this test"
    vllm_keys = re.findall(r"^\s+(\w+)=", vllm_block.group(1), re.MULTILINE)
    assert {"vllm_gpu_memory_utilization", "vllm_tensor_parallel_size"} <= set(vllm_keys)
    keys += vllm_keys
    assert not set(keys) - fields, f"smoke.sh passes flags the server does not have: {sorted(set(keys) - fields)}"
    literal_flags = set(re.findall(r'"--([a-z0-9-]+)"', text))
    assert literal_flags == {"vllm-enforce-eager"} and "vllm_enforce_eager" in fields
    variables = set(re.findall(r"\bSDM_[A-Z_]*[A-Z]\b", text)) - {"SDM_WHEELS", "SDM_SMOKE_VENV"}
    known = {env_name(f) for f in fields}
    assert variables <= known, f"smoke.sh reads SDM_* variables the server does not know: {sorted(variables - known)}"
    assert (ROOT / "deploy" / "bundles" / "smollm2-word-order" / "bundle.json").is_file()
