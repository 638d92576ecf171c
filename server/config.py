"""The server's configuration: one validated dataclass, every field a CLI flag and an ``SDM_*`` environment variable.

Size: one list of every server setting with its checks; split, an operator would look for a flag in two places.

A flag wins over its environment variable, which wins over the default::

    python -m server --bundle runs/smollm2/bundle --port 8080
    SDM_BUNDLE=runs/smollm2/bundle SDM_PORT=8080 python -m server

API keys come from ``SDM_API_KEYS`` (comma-separated), ``--api-key-file`` / ``SDM_API_KEY_FILE`` (one key a line,
``#`` comments), or ``--api-keys`` (visible in ``ps``; prefer the other two). Admin keys (``SDM_ADMIN_API_KEYS``) are
separate: only they open ``/admin/*``. Validation happens at construction and every error names the flag and the
variable to change.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

from sdm_core.settings import DEVICE_HELP, CommandLine, SettingsError, parse_device, setting

__all__ = ["ServerConfig", "ConfigError", "build_parser", "ENV_PREFIX", "traffic_url"]

ENV_PREFIX = "SDM_"
BACKENDS = ("transformers", "vllm")
DTYPES = ("auto", "float32", "bfloat16", "float16")
HIDDEN_STATE_MODES = ("auto", "reuse", "forward")
VLLM_HIDDEN_STATE_MODES = ("auto", "engine", "transformers")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


class ConfigError(SettingsError):
    """A setting is missing or invalid; the message says which flag / variable to change and how."""


@dataclass(frozen=True)
class ServerConfig:
    """Every setting of ``python -m server``. Construct directly (tests) or with :meth:`from_sources` (CLI + env)."""

    bundle: str = setting(
        "",
        help="path to an sdm-lm bundle folder (bundle.json, model/ or adapter/, tokenizer/, head/)",
        metavar="PATH",
        required=True,
    )
    extra_bundles: tuple[str, ...] = setting(
        (),
        help="comma-separated NAME=PATH pairs: more adapter bundles over the default bundle's base model, served by "
        "the same engine beside --bundle (which --model-name names); a request's model picks one (transformers "
        "backend only)",
        metavar="NAME=PATH,...",
    )
    backend: str = setting("transformers", help="generation backend", choices=BACKENDS)
    host: str = setting("127.0.0.1", help="interface to listen on (0.0.0.0 for all)")
    port: int = setting(8000, help="TCP port")
    device: str = setting("auto", help=f"torch device: {DEVICE_HELP}")
    dtype: str = setting(
        "auto", help="model dtype; auto = the dtype the bundle was written in (what training used)", choices=DTYPES
    )
    default_max_tokens: int = setting(128, help="max_tokens when a request gives none")
    max_tokens_cap: int = setting(512, help="largest max_tokens a request may ask for (larger: 400)")
    max_prompt_tokens: int = setting(2048, help="longest rendered prompt in tokens (longer: 400)")
    max_body_bytes: int = setting(1_048_576, help="largest request body in bytes (larger: 413)")
    max_concurrent_requests: int = setting(16, help="requests processed at once; more wait in the queue")
    max_queue_size: int = setting(64, help="requests allowed to wait for a slot; beyond it: 429 with Retry-After")
    request_timeout_s: float = setting(120.0, help="per-request limit, queue included (exceeded: 504)")
    batch_size: int = setting(16, help="most requests per generation / hidden-state batch")
    batch_wait_ms: float = setting(5.0, help="how long a batch waits for more requests before it runs")
    batch_rejoin_ms: float = setting(
        250.0,
        help="transformers backend: how long the generation batch after one of n requests waits for n new ones "
        "(the clients just answered, coming back) before it runs short; 0 turns it off",
    )
    hidden_states: str = setting(
        "auto",
        help="where the head's input comes from: reuse (the states generation computed, when they cover the "
        "verification text exactly), forward (a separate pass, as training ran it), auto (transformers backend: reuse "
        "with a float32 model, else forward; vllm backend's engine head input: reuse, i.e. the verification request "
        "reads the prefix cache and takes the cached positions' states from the generation)",
        choices=HIDDEN_STATE_MODES,
    )
    api_keys: tuple[str, ...] = setting(
        (), help="comma-separated API keys (prefer SDM_API_KEYS or --api-key-file: flags show in ps)", metavar="KEYS"
    )
    api_key_file: str = setting("", help="file with one API key a line (# comments allowed)", metavar="PATH")
    admin_api_keys: tuple[str, ...] = setting(
        (),
        help="comma-separated admin keys: the only keys POST /admin/* accepts (they work on every other route too); "
        "with client keys but no admin keys the admin routes are refused (prefer SDM_ADMIN_API_KEYS: flags show in ps)",
        metavar="KEYS",
    )
    bundles_root: str = setting(
        "",
        help='folder whose sub-folders POST /admin/reload may load, by name ({"bundle": "NAME"}); empty: reload only '
        "re-reads the served bundle",
        metavar="PATH",
    )
    cors_allow_origins: tuple[str, ...] = setting(
        (),
        help="comma-separated origins browsers may call the API from (e.g. https://app.example); empty: no CORS "
        "(browsers refuse cross-origin calls)",
        metavar="ORIGINS",
    )
    sse_keepalive_s: float = setting(
        15.0,
        help="seconds between SSE keep-alive comments on a stream that has nothing to send (proxies drop idle "
        "connections)",
    )
    metrics_require_key: bool = setting(True, help="whether GET /metrics needs an API key when keys are configured")
    warmup: bool = setting(True, help="run one request through the whole pipeline before /ready turns 200")
    log_level: str = setting("info", help="log level", choices=LOG_LEVELS)
    model_name: str = setting(
        "",
        help="model id reported by /v1/models and in responses (default: the bundle folder's name, or its parent's "
        "when it is called 'bundle')",
    )
    max_attempts_cap: int = setting(8, help="largest max_attempts a request may ask for")
    max_exemplars: int = setting(32, help="largest return_exemplars a request may ask for")
    drain_timeout_s: float = setting(
        125.0,
        help="on SIGTERM, how long in-flight requests may take to finish; those still running then get a 503 (keep it "
        ">= --request-timeout-s)",
    )
    verify_bundle: bool = setting(True, help="check the sha256 of every bundle file on load")
    otlp_traces_endpoint: str = setting(
        "",
        help="OTLP/HTTP traces endpoint (e.g. http://collector:4318/v1/traces): a span per request and per stage "
        "(admission, each attempt's generation and verification); empty: tracing off",
        metavar="URL",
    )
    otel_service_name: str = setting("sdm-lm", help="service.name of the exported spans")
    vllm_max_model_len: int = setting(
        0, help="vllm backend: longest sequence (prompt + completion) in tokens; 0 = the model's own limit"
    )
    vllm_gpu_memory_utilization: float = setting(
        0.0,
        help="vllm backend: share of GPU memory for weights + KV cache; 0 = vLLM's default (leave room for the "
        "verification pass)",
    )
    vllm_tensor_parallel_size: int = setting(1, help="vllm backend: GPUs to split the model across")
    vllm_enforce_eager: bool = setting(
        False,
        help="vllm backend: run eagerly, without CUDA graphs or torch.compile (starts faster, holds less memory, "
        "decodes slower; CPU always runs eager)",
    )
    vllm_max_num_seqs: int = setting(0, help="vllm backend: most sequences the engine runs at once; 0 = vLLM's default")
    vllm_block_size: int = setting(
        0,
        help="vllm backend: KV-cache block size in tokens (also the prefix cache's unit, so the part of a verification "
        "text the engine recomputes; on CPU a multiple of 32); 0 = automatic: 32 on CPU when the engine head input "
        "reads the prefix cache, else vLLM's default (128 on CPU, 16 on GPU)",
    )
    vllm_hidden_states: str = setting(
        "auto",
        help="vllm backend: where the head's input comes from: engine (the vLLM engine's own final-layer states, "
        "recorded in its worker: no second copy of the weights), transformers (a transformers prefill over a second "
        "copy of the weights, as training ran it), auto (engine for a float32 model whose recipe reads the final "
        "layer, else transformers)",
        choices=VLLM_HIDDEN_STATE_MODES,
    )
    # -- the traffic store and feedback (server/traffic.py, server/feedback.py) --
    data_dir: str = setting(
        "sdm-data",
        help="folder for the server's own data: the default traffic store (SQLite) lives here",
        metavar="PATH",
    )
    traffic_store: str = setting(
        "sqlite",
        help="where every verification is recorded: sqlite (a file under --data-dir), off, or a SQLAlchemy URL shared "
        "by replicas (postgresql+psycopg://user@host/db)",
        metavar="STORE",
    )
    store_text: bool = setting(
        False,
        help="also record prompt and answer text (off: only decisions and the head's input; see docs/operations.md on "
        "privacy)",
    )
    traffic_sample_rate: float = setting(
        1.0, help="share of answers recorded, in (0, 1]; unrecorded answers cannot get feedback"
    )
    traffic_queue_size: int = setting(
        10000,
        help="records waiting for the background writer; beyond it they are dropped "
        "(sdm_traffic_records_dropped_total)",
    )
    traffic_retention_days: float = setting(30.0, help="delete records older than this many days (0: keep them)")
    traffic_max_rows: int = setting(1_000_000, help="keep at most this many records, deleting the oldest (0: no limit)")
    feedback_max_items: int = setting(1000, help="most labels one POST /v1/feedback may carry")
    feedback_max_note_chars: int = setting(2000, help="longest note a label may carry, in characters")

    def __post_init__(self) -> None:
        self._normalise_lists()
        self._check_bundle()
        self._check_choices_and_limits()
        self._check_extra_bundles()
        _check_traffic(self)
        try:
            object.__setattr__(self, "device", parse_device(self.device))
        except ValueError:
            raise ConfigError(_hint("device", f"must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")) from None
        self._read_key_file()
        self._check_access()

    def _normalise_lists(self) -> None:
        object.__setattr__(self, "api_keys", tuple(k.strip() for k in self.api_keys if k and k.strip()))
        object.__setattr__(
            self, "admin_api_keys", tuple(dict.fromkeys(k.strip() for k in self.admin_api_keys if k and k.strip()))
        )
        object.__setattr__(
            self, "cors_allow_origins", tuple(o.strip().rstrip("/") for o in self.cors_allow_origins if o and o.strip())
        )

    def _check_bundle(self) -> None:
        if not self.bundle:
            raise ConfigError(
                _hint(
                    "bundle",
                    "is required: the bundle to serve (build one with python -m training.calibrate, or "
                    "bench/finetune_preset.py)",
                )
            )
        root = Path(self.bundle).expanduser()
        if not (root / "bundle.json").is_file():
            what = "does not exist" if not root.exists() else "is not an sdm-lm bundle (no bundle.json)"
            raise ConfigError(
                _hint("bundle", f"{self.bundle!r} {what}; point it at a folder written by python -m training.calibrate")
            )

    def _check_extra_bundles(self) -> None:
        """NAME=PATH pairs: names unique, apart from the default model's, usable as model ids; each path a bundle."""
        names: list[str] = []
        for pair in self.extra_bundles:
            name, sep, path = pair.partition("=")
            name, path = name.strip(), path.strip()
            if not sep or not name or not path:
                raise ConfigError(_hint("extra_bundles", f"holds {pair!r}; give NAME=PATH pairs, comma-separated"))
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:-]*", name):
                raise ConfigError(
                    _hint("extra_bundles", f"names {name!r}; a name is letters, digits, '.', '_', ':' or '-'")
                )
            if name == self.served_model_name or name in names:
                what = "the default bundle's model name" if name == self.served_model_name else "named twice"
                raise ConfigError(
                    _hint("extra_bundles", f"names {name!r}, {what}; give each served bundle a name of its own")
                )
            root = Path(path).expanduser()
            if not (root / "bundle.json").is_file():
                what = "does not exist" if not root.exists() else "is not an sdm-lm bundle (no bundle.json)"
                raise ConfigError(_hint("extra_bundles", f"has {name}={path!r}, which {what}"))
            names.append(name)
        if names and self.backend == "vllm" and self.vllm_hidden_states == "transformers":
            raise ConfigError(
                _hint(
                    "extra_bundles",
                    "needs the engine's head input with --backend vllm (--vllm-hidden-states engine or auto): the "
                    "transformers head input holds one merged model; run one server per bundle for it",
                )
            )

    @property
    def extra_bundle_paths(self) -> dict[str, str]:
        """--extra-bundles as ``{name: path}``, in the order given."""
        pairs = (pair.partition("=") for pair in self.extra_bundles)
        return {name.strip(): str(Path(path.strip()).expanduser()) for name, _, path in pairs}

    def _check_choices_and_limits(self) -> None:
        _choice(self, "backend", BACKENDS)
        _choice(self, "dtype", DTYPES)
        _choice(self, "hidden_states", HIDDEN_STATE_MODES)
        _choice(self, "log_level", LOG_LEVELS)
        if not (1 <= self.port <= 65535):
            raise ConfigError(_hint("port", f"must be between 1 and 65535, got {self.port}"))
        for name in (
            "default_max_tokens",
            "max_tokens_cap",
            "max_prompt_tokens",
            "max_body_bytes",
            "max_concurrent_requests",
            "batch_size",
            "max_attempts_cap",
        ):
            _positive_int(self, name)
        for name in ("max_queue_size", "max_exemplars"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(_hint(name, f"must be an integer >= 0, got {value!r}"))
        self._check_vllm()
        if self.default_max_tokens > self.max_tokens_cap:
            raise ConfigError(
                _hint(
                    "default_max_tokens",
                    f"({self.default_max_tokens}) must not exceed --max-tokens-cap ({self.max_tokens_cap}); lower it "
                    "or raise the cap",
                )
            )
        for name in ("request_timeout_s", "drain_timeout_s", "sse_keepalive_s"):
            if not (getattr(self, name) > 0):
                raise ConfigError(_hint(name, f"must be > 0 seconds, got {getattr(self, name)!r}"))
        for name in ("batch_wait_ms", "batch_rejoin_ms"):
            if not (getattr(self, name) >= 0):
                raise ConfigError(_hint(name, f"must be >= 0, got {getattr(self, name)!r}"))

    def _read_key_file(self) -> None:
        if self.api_key_file:
            path = Path(self.api_key_file).expanduser()
            if not path.is_file():
                raise ConfigError(
                    _hint("api_key_file", f"{self.api_key_file!r} does not exist; create it with one key a line")
                )
            keys = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
            keys = [k for k in keys if k and not k.startswith("#")]
            if not keys:
                raise ConfigError(
                    _hint("api_key_file", f"{self.api_key_file!r} holds no key (one a line; # starts a comment)")
                )
            object.__setattr__(self, "api_keys", tuple(dict.fromkeys(self.api_keys + tuple(keys))))

    def _check_access(self) -> None:
        """Admin keys apart from client keys, the bundles root, the CORS origins."""
        shared = set(self.api_keys) & set(self.admin_api_keys)
        if shared:
            raise ConfigError(
                _hint(
                    "admin_api_keys",
                    f"holds {len(shared)} key(s) that are also client keys (--api-keys / --api-key-file); an admin key "
                    "must be a key of its own",
                )
            )
        if self.bundles_root:
            root = Path(self.bundles_root).expanduser()
            if not root.is_dir():
                raise ConfigError(
                    _hint(
                        "bundles_root",
                        f"{self.bundles_root!r} is not a folder; point it at the folder that holds the bundles POST "
                        "/admin/reload may load",
                    )
                )
        for origin in self.cors_allow_origins:
            if origin != "*" and not (
                origin.startswith(("http://", "https://")) and "/" not in origin.split("://", 1)[1]
            ):
                raise ConfigError(
                    _hint(
                        "cors_allow_origins",
                        f"has {origin!r}; give origins as scheme://host[:port] (or * for any), comma-separated",
                    )
                )

    # -- derived values --------------------------------------------------------------------------------------
    def _check_vllm(self) -> None:
        """The vllm_* settings (GPU settings of the vLLM engine)."""
        _positive_int(self, "vllm_tensor_parallel_size")
        _choice(self, "vllm_hidden_states", VLLM_HIDDEN_STATE_MODES)
        for name in ("vllm_max_num_seqs", "vllm_block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(_hint(name, f"must be an integer >= 0 (0: vLLM's default), got {value!r}"))
        if (
            not isinstance(self.vllm_max_model_len, int)
            or isinstance(self.vllm_max_model_len, bool)
            or self.vllm_max_model_len < 0
        ):
            raise ConfigError(
                _hint(
                    "vllm_max_model_len",
                    f"must be an integer >= 0 (0: the model's limit), got {self.vllm_max_model_len!r}",
                )
            )
        if not (0.0 <= self.vllm_gpu_memory_utilization < 1.0):
            raise ConfigError(
                _hint(
                    "vllm_gpu_memory_utilization",
                    f"must be in [0, 1) (0: vLLM's default), got {self.vllm_gpu_memory_utilization!r}",
                )
            )

    def vllm_settings(self) -> dict:
        """The vllm backend's engine settings from the vllm_* options (unset ones are left to vLLM)."""
        engine_args: dict = {}
        if self.vllm_gpu_memory_utilization > 0:
            engine_args["gpu_memory_utilization"] = self.vllm_gpu_memory_utilization
        if self.vllm_tensor_parallel_size > 1:
            engine_args["tensor_parallel_size"] = self.vllm_tensor_parallel_size
        if self.vllm_enforce_eager:
            engine_args["enforce_eager"] = True
        if self.vllm_max_num_seqs > 0:
            engine_args["max_num_seqs"] = self.vllm_max_num_seqs
        if self.vllm_block_size > 0:
            engine_args["block_size"] = self.vllm_block_size
        return {
            "max_model_len": self.vllm_max_model_len or None,
            "engine_args": engine_args,
            "head_input": self.vllm_hidden_states,
        }

    @property
    def served_model_name(self) -> str:
        """--model-name, else the bundle folder's name (its parent's for a folder called "bundle":
        runs/smollm2/bundle -> smollm2)."""
        if self.model_name:
            return self.model_name
        path = Path(self.bundle).expanduser().resolve()
        return path.parent.name if path.name == "bundle" and path.parent.name else path.name

    @property
    def auth_enabled(self) -> bool:
        """Whether the client routes need a key (client keys are configured)."""
        return bool(self.api_keys)

    @property
    def admin_enabled(self) -> bool:
        return bool(self.admin_api_keys)

    def resolved_device(self) -> str:
        """The torch device to load on: ``auto`` resolved, a CUDA device checked against what torch sees."""
        from sdm_core.lm.models import resolve_device

        try:
            return resolve_device(self.device)
        except ValueError:
            raise ConfigError(
                _hint("device", f"is {self.device!r} but torch sees no CUDA device; use --device cpu")
            ) from None

    def check_runtime(self) -> None:
        """Checks that need the runtime (torch, vllm): run once at start, before loading anything."""
        device = self.resolved_device()
        if device == "cpu" and self.dtype == "float16":
            raise ConfigError(_hint("dtype", "float16 is not supported on CPU; use float32 (or bfloat16)"))
        if self.backend == "vllm" and importlib.util.find_spec("vllm") is None:
            raise ConfigError(
                _hint(
                    "backend",
                    "is 'vllm' but vllm is not installed: pip install 'sdm-lm[vllm]', or use --backend transformers",
                )
            )

    def to_dict(self, redact: bool = True) -> dict:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        if redact and "://" in self.traffic_store:
            from sdm_core.traffic import redact_url

            data["traffic_store"] = redact_url(self.traffic_store)
        data["api_keys"] = [f"<{len(self.api_keys)} keys>"] if redact and self.api_keys else list(self.api_keys)
        data["admin_api_keys"] = (
            [f"<{len(self.admin_api_keys)} keys>"] if redact and self.admin_api_keys else list(self.admin_api_keys)
        )
        return data

    # -- parsing ---------------------------------------------------------------------------------------------
    @classmethod
    def from_sources(cls, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> ServerConfig:
        """Flags, then ``SDM_*`` variables, then defaults. Raises :class:`ConfigError` (argparse exits on bad flags)."""
        return COMMAND_LINE.resolve(COMMAND_LINE.parser().parse_args(argv), environ)


def _check_traffic(config: ServerConfig) -> None:
    store = config.traffic_store.strip()
    if not store:
        raise ConfigError(
            _hint("traffic_store", "must be sqlite, off, or a SQLAlchemy URL such as postgresql+psycopg://user@host/db")
        )
    if store not in ("sqlite", "off") and "://" not in store:
        raise ConfigError(
            _hint("traffic_store", f"must be sqlite, off, or a SQLAlchemy URL (driver://...), got {store!r}")
        )
    if store == "sqlite" and not config.data_dir.strip():
        raise ConfigError(_hint("data_dir", "is required when --traffic-store is sqlite (the store is a file in it)"))
    if not (0.0 < config.traffic_sample_rate <= 1.0):
        raise ConfigError(
            _hint(
                "traffic_sample_rate",
                f"must be in (0, 1] (use --traffic-store off to record nothing), got {config.traffic_sample_rate!r}",
            )
        )
    if not (config.traffic_retention_days >= 0):
        raise ConfigError(
            _hint("traffic_retention_days", f"must be >= 0 (0: keep records), got {config.traffic_retention_days!r}")
        )
    for name in ("traffic_queue_size", "feedback_max_items", "feedback_max_note_chars"):
        _positive_int(config, name)
    if (
        not isinstance(config.traffic_max_rows, int)
        or isinstance(config.traffic_max_rows, bool)
        or config.traffic_max_rows < 0
    ):
        raise ConfigError(
            _hint("traffic_max_rows", f"must be an integer >= 0 (0: no limit), got {config.traffic_max_rows!r}")
        )


def traffic_url(config: ServerConfig) -> str | None:
    """The SQLAlchemy URL of the traffic store, or None when recording is off."""
    store = config.traffic_store.strip()
    if store == "off":
        return None
    if store == "sqlite":
        return "sqlite:///" + str((Path(config.data_dir).expanduser() / "traffic.sqlite3").resolve())
    return store


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _hint(name: str, message: str) -> str:
    return f"--{_flag(name)} (env {env_name(name)}) {message}"


def _choice(config: ServerConfig, name: str, choices: Sequence[str]) -> None:
    value = getattr(config, name)
    if value not in choices:
        raise ConfigError(_hint(name, f"must be one of {', '.join(choices)}; got {value!r}"))


def _positive_int(config: ServerConfig, name: str) -> None:
    value = getattr(config, name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(_hint(name, f"must be an integer >= 1, got {value!r}"))


COMMAND_LINE = CommandLine(
    ServerConfig,
    prog="python -m server",
    env_prefix=ENV_PREFIX,
    switches=True,
    error=ConfigError,
    description="sdm-lm selective-generation server: every answer comes with a calibrated probability, or an "
    "abstention.",
    epilog="Every flag can also be set with the environment variable shown; a flag wins over its variable.",
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: one flag per :class:`ServerConfig` field, each help naming its ``SDM_*`` variable."""
    return COMMAND_LINE.parser()
