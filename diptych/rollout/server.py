"""Server mode: a vLLM engine in another process (or on other GPUs), reached over loopback HTTP.

The wire format needs no pickling: requests and rollouts are JSON, weights are safetensors bytes
(``POST /weights`` with the version in ``X-Weight-Version``), which a receiver parses as plain
arrays. Trainer and server agree on a weight version: the trainer sends the version it believes the
server holds with every ``/generate``, the server refuses a mismatch (HTTP 409) instead of sampling
with stale weights, and every rollout records the version it was sampled with.

Endpoints: ``GET /health``, ``POST /generate``, ``POST /weights``, ``POST /adapters`` (a LoRA policy's adapters
as safetensors bytes, its LoRAConfig as JSON in ``X-LoRA-Config``: a server started with ``--max-lora-rank``
serves them on its shared base), ``POST /shutdown``. The server
handles one request at a time (vLLM's ``LLM`` is not re-entrant); it binds loopback by default.

The collective weight channel (``vllm.weight_channel: collective``, ``diptych.rollout.collective``) keeps this
control plane and moves the tensors by broadcast instead: ``POST /collective/init`` tells the server where the
trainer's store listens (the server joins on a thread), ``POST /weights/collective`` sends the manifest and the
version (checked before any tensor moves, so a refusal never leaves a broadcast hanging) and starts the receive,
the trainer broadcasts, and ``POST /weights/collective/commit`` loads what arrived and adopts the version.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import numpy as np

from diptych.core.sampling import Rollout, SamplingConfig, SamplingError
from diptych.rollout.base import (
    RolloutEngineError,
    VLLMConfig,
    WeightsLike,
    check_version,
    resolve_logprobs_mode,
    sampling_from_dict,
    sampling_to_dict,
    weight_items,
)

VERSION_HEADER = "X-Weight-Version"
LORA_HEADER = "X-LoRA-Config"
ROLLOUT_FIELDS = ("prompt_tokens", "prompt_mask", "completion_tokens", "completion_mask", "logprobs", "lengths",
                  "truncated")
_DTYPES = {"logprobs": np.float32, "truncated": bool}


def rollout_to_json(rollout: Rollout) -> dict[str, Any]:
    out: dict[str, Any] = {k: np.asarray(getattr(rollout, k)).tolist() for k in ROLLOUT_FIELDS}
    out["extras"] = {k: v for k, v in rollout.extras.items() if isinstance(v, (int, float, str, bool))}
    return out


def rollout_from_json(d: dict[str, Any]) -> Rollout:
    arrays = {k: np.asarray(d[k], dtype=_DTYPES.get(k, np.int32)) for k in ROLLOUT_FIELDS}
    for k in ("prompt_tokens", "prompt_mask", "completion_tokens", "completion_mask", "logprobs"):
        if arrays[k].ndim != 2:  # an empty row list decodes to 1-D
            arrays[k] = arrays[k].reshape(len(d["lengths"]), -1)
    return Rollout(**arrays, extras=dict(d.get("extras", {})))


# -- the server --------------------------------------------------------------------------------
class _Collective:
    """The server's end of the collective channel: the group (joined on a thread) and a receive in flight."""

    def __init__(self) -> None:
        self.group: Any = None
        self.error: str | None = None
        self.joining: threading.Thread | None = None
        self.receiving: threading.Thread | None = None
        self.received: dict[str, Any] | None = None
        self.version: int | None = None
        self.timeout_s = 600.0

    @property
    def status(self) -> str:
        if self.error is not None:
            return f"failed: {self.error}"
        if self.joining is not None and self.joining.is_alive():
            return "joining"
        return "ready" if self.group is not None else "none"

    def start_join(self, host: str, port: int, backend: str, timeout_s: float) -> None:
        from diptych.rollout.collective import WeightGroup

        self.close()
        self.timeout_s = float(timeout_s)

        def join() -> None:
            try:
                self.group = WeightGroup.join(host, port, backend, timeout_s)
            except Exception as e:  # reported by /health and the next sync
                self.error = f"{type(e).__name__}: {e}"

        self.joining = threading.Thread(target=join, name="diptych-collective-join", daemon=True)
        self.joining.start()

    def ready(self) -> Any:
        if self.joining is not None:
            self.joining.join(self.timeout_s)
        if self.error is not None or self.group is None:
            raise RolloutEngineError(f"the collective weight channel is not open ({self.status}); the trainer "
                                     "opens it with POST /collective/init (vllm.weight_channel: collective).")
        return self.group

    def start_receive(self, man: list[dict[str, Any]], bucket_bytes: int, version: int) -> None:
        group = self.ready()
        if self.receiving is not None and self.receiving.is_alive():
            raise RolloutEngineError("a collective weight sync is already in flight; commit it first.")
        self.received, self.version, self.error = None, version, None

        def receive() -> None:
            try:
                self.received = group.receive(man, bucket_bytes)
            except Exception as e:
                self.error = f"{type(e).__name__}: {e}"

        self.receiving = threading.Thread(target=receive, name="diptych-collective-receive", daemon=True)
        self.receiving.start()

    def finish_receive(self, version: int) -> dict[str, Any]:
        if self.receiving is None or self.version != version:
            raise RolloutEngineError(f"no collective weight sync to version {version} is in flight; POST "
                                     "/weights/collective first.")
        self.receiving.join(self.timeout_s)
        if self.receiving.is_alive():
            raise RolloutEngineError(f"the collective weight receive did not finish within {self.timeout_s:.0f} s.")
        self.receiving = None
        if self.error is not None or self.received is None:
            err, self.error = self.error, None
            raise RolloutEngineError(f"the collective weight receive failed ({err}).")
        out, self.received = self.received, None
        return out

    def close(self) -> None:
        if self.group is not None:
            self.group.close()
        self.group, self.error, self.joining, self.received = None, None, None, None


def _device_uuid(engine: Any) -> str | None:
    if str(getattr(engine, "device", "cpu")) != "cuda":
        return None
    from diptych.rollout.collective import cuda_uuid

    return cuda_uuid()


def _expected_shapes(engine: Any) -> dict[str, tuple[int, ...]] | None:
    spec = getattr(engine, "spec", None)
    shapes = getattr(spec, "param_shapes", None)
    return dict(shapes()) if callable(shapes) else None


class _Handler(BaseHTTPRequestHandler):
    engine: Any = None
    collective: _Collective | None = None
    server_version = "diptych-rollout"

    def log_message(self, format: str, *args: Any) -> None:  # quiet: the trainer's log is the log
        pass

    def _reply(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def do_GET(self) -> None:
        if self.path != "/health":
            return self._reply(404, {"error": f"no GET {self.path}; try /health"})
        eng = self.engine
        self._reply(200, {"status": "ok", "weight_version": eng.weight_version, "model_type": eng.spec.model_type,
                          "logprobs_mode": eng.mode, "max_model_len": eng.max_model_len, "pid": os.getpid(),
                          "device": str(getattr(eng, "device", "cpu")), "device_uuid": _device_uuid(eng),
                          "max_lora_rank": int(getattr(eng, "max_lora_rank", 0) or 0),
                          "collective": self.collective.status})

    def do_POST(self) -> None:
        eng = self.engine
        try:
            if self.path == "/generate":
                req = json.loads(self._body() or b"{}")
                want = req.get("version")
                if want is not None and int(want) != eng.weight_version:
                    msg = (f"weight version mismatch: the trainer expects {want}, the server holds "
                           f"{eng.weight_version}; sync the weights first.")
                    return self._reply(409, {"error": msg, "weight_version": eng.weight_version})
                sampling = sampling_from_dict(req.get("sampling") or {})
                rollout = eng.generate(req["prompts"], sampling, seed=req.get("seed"))
                return self._reply(200, {"weight_version": eng.weight_version, "rollout": rollout_to_json(rollout)})
            if self.path == "/weights":
                from safetensors.numpy import load

                version = self.headers.get(VERSION_HEADER)
                if version is None:
                    return self._reply(400, {"error": f"POST /weights needs the {VERSION_HEADER} header."})
                eng.sync_weights(load(self._body()), int(version))
                return self._reply(200, {"weight_version": eng.weight_version})
            if self.path == "/adapters":
                from safetensors.numpy import load

                from diptych.core.lora import LoRAConfig

                version, conf = self.headers.get(VERSION_HEADER), self.headers.get(LORA_HEADER)
                if version is None or conf is None:
                    return self._reply(400, {"error": f"POST /adapters needs the {VERSION_HEADER} and {LORA_HEADER} "
                                                      "headers."})
                if not callable(getattr(eng, "sync_adapters", None)) or not getattr(eng, "serves_lora", False):
                    return self._reply(400, {"error": "this rollout server serves no LoRA adapters; restart it with "
                                                      "--max-lora-rank R, or sync merged weights."})
                lora = json.loads(conf)
                lora["targets"] = tuple(lora.get("targets", ()))
                eng.sync_adapters(load(self._body()), LoRAConfig(**lora), int(version))
                return self._reply(200, {"weight_version": eng.weight_version, "adapter": eng.adapter})
            if self.path == "/collective/init":
                req = json.loads(self._body() or b"{}")
                backend = req.get("backend", "gloo")
                if backend not in ("gloo", "nccl"):
                    return self._reply(400, {"error": f"collective backend must be gloo or nccl, got {backend!r}."})
                if backend == "nccl" and str(getattr(eng, "device", "cpu")) != "cuda":
                    return self._reply(400, {"error": "this server is not on CUDA; use the gloo backend."})
                self.collective.start_join(str(req["host"]), int(req["port"]), backend,
                                           float(req.get("timeout_s", 600.0)))
                return self._reply(200, {"collective": self.collective.status})
            if self.path == "/weights/collective":
                from diptych.rollout.collective import BUCKET_BYTES, check_manifest, plan_buckets

                req = json.loads(self._body() or b"{}")
                version = check_version(req.get("version"), eng.weight_version)
                man = check_manifest(req.get("manifest"), _expected_shapes(eng))
                bucket_bytes = int(req.get("bucket_bytes", BUCKET_BYTES))
                self.collective.start_receive(man, bucket_bytes, version)
                return self._reply(200, {"buckets": len(plan_buckets(man, bucket_bytes)), "version": version})
            if self.path == "/weights/collective/commit":
                req = json.loads(self._body() or b"{}")
                version = int(req["version"])
                eng.sync_weights(self.collective.finish_receive(version), version)
                return self._reply(200, {"weight_version": eng.weight_version})
            if self.path == "/shutdown":
                self._reply(200, {"status": "stopping"})
                threading.Thread(target=self.server.shutdown, daemon=True).start()
                return None
            return self._reply(404, {"error": f"no POST {self.path}; try /generate, /weights or /shutdown"})
        except (RolloutEngineError, SamplingError, KeyError, ValueError, TypeError) as e:
            return self._reply(400, {"error": f"{type(e).__name__}: {e}"})
        except Exception as e:  # keep serving; the client reports it
            return self._reply(500, {"error": f"{type(e).__name__}: {e}"})


def serve(engine: Any, host: str = "127.0.0.1", port: int = 0, port_file: str | os.PathLike | None = None,
          log: Any = print) -> None:
    """Serve ``engine`` until ``POST /shutdown``; ``port`` 0 takes a free one, written to ``port_file``
    (atomically) once the server listens, so a parent knows when and where to connect."""
    collective = _Collective()
    handler = type("Handler", (_Handler,), {"engine": engine, "collective": collective})
    httpd = HTTPServer((host, int(port)), handler)
    url = f"http://{host}:{httpd.server_address[1]}"
    if port_file is not None:
        tmp = Path(f"{port_file}.tmp")
        tmp.write_text(url + "\n")
        tmp.replace(port_file)
    log(f"diptych rollout-server: listening on {url} (weight version {engine.weight_version})")
    try:
        httpd.serve_forever()
    finally:
        httpd.server_close()
        collective.close()
        engine.close()


# -- the client --------------------------------------------------------------------------------
class ServerEngine:
    """The engine protocol over HTTP to a ``diptych rollout-server``; see the module docstring.

    ``process`` is the server this client started (it is shut down on :meth:`close`); a client of a
    server somebody else started (``vllm.url``) leaves it running.
    """

    name = "vllm"

    def __init__(self, url: str, *, version: int = 0, timeout_s: float = 600.0,
                 process: subprocess.Popen | None = None, workdir: Any = None) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = float(timeout_s)
        self.process, self._workdir = process, workdir
        self._version = check_version(version, 0)
        self.closed = False
        self.channel = "http"
        """How weights travel: ``http`` (safetensors bytes) or ``collective`` (see :meth:`open_collective`)."""
        self.group: Any = None
        self.max_lora_rank = 0
        """The server's LoRA slots (its ``--max-lora-rank``; 0: none). :attr:`serves_lora` follows from it."""
        self.bucket_bytes: int | None = None
        """Collective channel: the largest flat buffer of one broadcast (None: collective.BUCKET_BYTES)."""
        self.last_sync: dict[str, Any] = {}
        """What the last sync moved: ``mode`` (full), ``channel``, ``bytes``, ``seconds``."""

    @classmethod
    def start(cls, spec: Any, weights: WeightsLike, *, sampling: SamplingConfig | None = None,
              config: VLLMConfig | None = None, version: int = 0, max_model_len: int | None = None,
              lora: Any = None, adapters: Any = None, merged: Any = None) -> ServerEngine:
        """Connect to ``config.url`` and push the weights, or start a server on loopback from them.

        A LoRA policy passes its base as ``weights``, its ``lora`` config and ``adapters``, and a callable giving
        its ``merged`` weights: a server of our own is started with LoRA slots and gets the adapters; a running
        server without LoRA slots gets the merged weights instead (unless ``vllm.lora_sync: adapters``)."""
        from diptych.rollout.vllm_engine import check_servable, lora_rank

        cfg = config or VLLMConfig(mode="server")
        check_servable(spec)
        use_adapters = lora is not None and cfg.lora_sync != "merged"
        if cfg.url is not None:  # somebody else's server: adopt its version, check its basis, push our weights
            eng = cls(cfg.url, timeout_s=cfg.timeout_s)
            health = eng.health()
            eng._version = int(health["weight_version"])
            want = resolve_logprobs_mode(cfg.logprobs, sampling)
            if health.get("logprobs_mode") != want:
                raise RolloutEngineError(
                    f"the rollout server at {cfg.url} returns {health.get('logprobs_mode')} log-probs but this run "
                    f"needs {want} ones; restart it with --logprobs {want}.")
            if cfg.weight_channel == "collective":
                eng.open_collective()
            eng.max_lora_rank = int(health.get("max_lora_rank", 0) or 0)
            next_version = max(int(version), eng._version + 1)
            if use_adapters and eng.max_lora_rank >= int(lora.r):
                eng.sync_weights(weights, next_version)  # the base, then the adapters on it, as one version
                eng.sync_adapters(adapters, lora, next_version)
            elif use_adapters and cfg.lora_sync == "adapters":
                raise RolloutEngineError(f"the rollout server at {cfg.url} has LoRA slots of rank {eng.max_lora_rank} "
                                         f"(--max-lora-rank), too few for lora.r={lora.r}; restart it with "
                                         f"--max-lora-rank {lora_rank(lora.r)} or set vllm.lora_sync: auto.")
            else:
                if lora is not None:  # slots too small (or none): this client syncs merged weights
                    eng.max_lora_rank = 0
                eng.sync_weights(merged() if lora is not None else weights, next_version)
            return eng
        from diptych.core.hf import save_hf_folder

        if lora is not None and not use_adapters:
            weights = merged()  # vllm.lora_sync: merged: the server never sees the adapters
        work = tempfile.TemporaryDirectory(prefix="diptych-rollout-server-")
        folder = save_hf_folder(Path(work.name) / "model", spec, dict(weight_items(weights)))
        port_file = Path(work.name) / "url"
        log_path = Path(work.name) / "server.log"
        mode = resolve_logprobs_mode(cfg.logprobs, sampling)
        cmd = [sys.executable, "-m", "diptych.commands.rollout_server", "--model", str(folder), "--host", "127.0.0.1",
               "--port", "0", "--port-file", str(port_file), "--logprobs", mode, "--version", str(int(version)),
               "--dtype", cfg.dtype, "--seed", str(cfg.seed)]
        if cfg.kv_cache_memory_bytes is not None:
            cmd += ["--kv-cache-memory-bytes", str(int(cfg.kv_cache_memory_bytes))]
        elif cfg.gpu_memory_utilization is not None:
            cmd += ["--gpu-memory-utilization", str(cfg.gpu_memory_utilization)]
        if max_model_len or cfg.max_model_len:
            cmd += ["--max-model-len", str(int(max_model_len or cfg.max_model_len))]
        if use_adapters:
            cmd += ["--max-lora-rank", str(lora_rank(lora.r))]
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + cfg.timeout_s
        while not port_file.is_file():
            if proc.poll() is not None:
                tail = _tail(log_path)
                work.cleanup()
                raise RolloutEngineError(f"the rollout server exited with status {proc.returncode} before it "
                                         f"listened; its log ends:\n{tail}")
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                work.cleanup()
                raise RolloutEngineError(f"the rollout server did not start within {cfg.timeout_s:.0f} s "
                                         "(vllm.timeout_s); is the machine overloaded?")
            time.sleep(0.2)
        eng = cls(port_file.read_text().strip(), version=version, timeout_s=cfg.timeout_s, process=proc,
                  workdir=work)
        eng.log_path = log_path
        eng.max_lora_rank = int(eng.health().get("max_lora_rank", 0) or 0)
        try:
            if cfg.weight_channel == "collective":
                eng.open_collective()
            if use_adapters and adapters is not None:
                eng.sync_adapters(adapters, lora, int(version))
        except Exception:
            eng.close()
            raise
        return eng

    @property
    def serves_lora(self) -> bool:
        """Whether the server has LoRA slots, so a LoRA policy syncs only its adapters (see push_weights)."""
        return self.max_lora_rank > 0

    def sync_adapters(self, adapters: Any, lora: Any, version: int) -> None:
        """Send a LoRA policy's adapters (safetensors bytes, over HTTP whatever the weight channel: they are small);
        the server serves them on its shared base from ``version`` on."""
        import dataclasses

        from safetensors.numpy import save

        version = check_version(version, self._version)
        if int(lora.r) > self.max_lora_rank:
            raise RolloutEngineError(f"adapters of rank {lora.r} exceed the rollout server's max_lora_rank "
                                     f"{self.max_lora_rank}; restart it with --max-lora-rank >= {lora.r}.")
        start = time.perf_counter()
        w = {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in adapters.items()}
        conf = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(lora).items()}
        reply = self._request("POST", "/adapters", save(w), {"Content-Type": "application/octet-stream",
                                                             VERSION_HEADER: str(version),
                                                             LORA_HEADER: json.dumps(conf)})
        if int(reply.get("weight_version", -1)) != version:
            raise RolloutEngineError(f"the rollout server reports weight version {reply.get('weight_version')} after "
                                     f"an adapter sync to {version}.")
        self._version = version
        self.last_sync = {"mode": "adapters", "channel": "http", "bytes": int(sum(a.nbytes for a in w.values())),
                          "seconds": time.perf_counter() - start}

    def open_collective(self, backend: str | None = None) -> str:
        """Switch weight syncs to the collective channel: form the private two-rank group with the server (NCCL
        when both ends are on CUDA, else gloo; ``backend`` forces one) and return its backend."""
        from diptych.rollout.collective import WeightGroup, choose_backend, local_address

        health = self.health()
        backend = backend or choose_backend(str(health.get("device", "cpu")), health.get("device_uuid"))
        host = local_address(urllib.parse.urlsplit(self.url).hostname or "127.0.0.1")
        pending, port = WeightGroup.open_store(host, backend, self.timeout_s)
        built: dict[str, Any] = {}

        def build() -> None:
            try:
                built["group"] = WeightGroup.host(pending, host, port, backend, self.timeout_s)
            except Exception as e:
                built["error"] = e

        thread = threading.Thread(target=build, name="diptych-collective-host", daemon=True)
        thread.start()
        self._request("POST", "/collective/init", json.dumps({"host": host, "port": port, "backend": backend,
                                                              "timeout_s": self.timeout_s}).encode(),
                      {"Content-Type": "application/json"})
        deadline = time.monotonic() + self.timeout_s
        while True:  # the server joins on its own thread; its /health says when it is in, or that it failed
            thread.join(0.05)
            status = str(self.health().get("collective", ""))
            if not thread.is_alive() and (status == "ready" or "error" in built):
                break
            if status.startswith("failed"):
                raise RolloutEngineError(f"the rollout server could not join the collective weight channel at "
                                         f"{host}:{port} ({status}); check that it can reach this machine, or set "
                                         "vllm.weight_channel: http.")
            if time.monotonic() > deadline:
                raise RolloutEngineError(f"the collective weight channel did not form within {self.timeout_s:.0f} s "
                                         "(vllm.timeout_s).")
        if "error" in built:
            raise RolloutEngineError(f"the collective weight channel failed to form ({type(built['error']).__name__}: "
                                     f"{built['error']}).") from built["error"]
        if self.group is not None:
            self.group.close()
        self.group, self.channel = built["group"], "collective"
        return backend

    # -- protocol ----------------------------------------------------------------------------
    @property
    def weight_version(self) -> int:
        return self._version

    def health(self) -> dict[str, Any]:
        return self._request("GET", "/health")

    def follow(self) -> int:
        """Adopt the server's current weight version (a client sharing the server with another that synced)."""
        self._version = check_version(int(self.health()["weight_version"]), self._version)
        return self._version

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, *,
                 seed: int | None = None) -> Rollout:
        body = json.dumps({"prompts": [[int(t) for t in p] for p in prompts], "sampling": sampling_to_dict(sampling),
                           "seed": seed, "version": self._version}).encode()
        reply = self._request("POST", "/generate", body, {"Content-Type": "application/json"})
        rollout = rollout_from_json(reply["rollout"])
        if int(rollout.extras.get("weight_version", -1)) != self._version:
            raise RolloutEngineError(f"the rollout server sampled with weight version "
                                     f"{rollout.extras.get('weight_version')}, the trainer expected {self._version}.")
        return rollout

    def sync_weights(self, weights: WeightsLike, version: int) -> None:
        """Send the canonical weights (one safetensors blob, or a broadcast on the collective channel); the server
        adopts ``version`` once they are loaded."""
        version = check_version(version, self._version)
        start = time.perf_counter()
        w = dict(weight_items(weights))
        if self.channel == "collective":
            reply = self._sync_collective(w, version)
        else:
            from safetensors.numpy import save

            reply = self._request("POST", "/weights", save(w), {"Content-Type": "application/octet-stream",
                                                                VERSION_HEADER: str(version)})
        if int(reply.get("weight_version", -1)) != version:
            raise RolloutEngineError(f"the rollout server reports weight version {reply.get('weight_version')} after "
                                     f"a sync to {version}.")
        self._version = version
        self.last_sync = {"mode": "full", "channel": self.channel, "bytes": int(sum(a.nbytes for a in w.values())),
                          "seconds": time.perf_counter() - start}

    def _sync_collective(self, w: dict[str, np.ndarray], version: int) -> dict[str, Any]:
        from diptych.rollout.collective import BUCKET_BYTES, manifest

        man, bucket = manifest(w), int(self.bucket_bytes or BUCKET_BYTES)
        self._request("POST", "/weights/collective", json.dumps({"version": version, "manifest": man,
                                                                 "bucket_bytes": bucket}).encode(),
                      {"Content-Type": "application/json"})
        try:  # the server accepted the manifest and is receiving: the broadcast cannot be left half-done
            self.group.send(w, man, bucket)
        except Exception as e:
            self._request("GET", "/health")  # a dead server is reported as such
            raise RolloutEngineError(f"the collective weight broadcast to {self.url} failed ({type(e).__name__}: "
                                     f"{e}).") from e
        return self._request("POST", "/weights/collective/commit", json.dumps({"version": version}).encode(),
                             {"Content-Type": "application/json"})

    def shutdown(self) -> None:
        """Ask the server to stop (a server this client started is also stopped by :meth:`close`)."""
        self._request("POST", "/shutdown", b"", timeout=10)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.group is not None:
            self.group.close()
            self.group = None
        if self.process is not None:
            with contextlib.suppress(RolloutEngineError):
                self.shutdown()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None

    # -- transport ---------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
                 timeout: float | None = None) -> dict[str, Any]:
        if self.closed and path != "/shutdown":
            raise RolloutEngineError("this rollout-server client was closed; make a new engine.")
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout_s) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            try:
                msg = json.loads(e.read()).get("error", "")
            except Exception:
                msg = ""
            raise RolloutEngineError(f"the rollout server at {self.url} refused {method} {path} (HTTP {e.code}): "
                                     f"{msg}") from None
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
            reason = getattr(e, "reason", e)
            dead = ""
            if self.process is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):  # a reset may come before the exit is reaped
                    self.process.wait(timeout=2)
                if self.process.returncode is not None:
                    dead = f" (the server process exited with status {self.process.returncode})"
            raise RolloutEngineError(
                f"the rollout server at {self.url} stopped answering {method} {path}: {reason}{dead}. It died or was "
                "shut down; restart it (diptych rollout-server) and resume from the last checkpoint.") from None


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
