"""Golden parity records: take a run's numbers on one machine, replay them on another.

`diptych parity` compares backends that share a process. A record carries the comparison to
machines that never meet: ``record`` runs the parity cases on one backend and writes, per
backend, a folder with ``record.json`` (format version, the models as HF configs plus a weight
seed or an HF folder's content hash, the environment, the case list with checksums) and
``arrays.npz`` (the exact inputs and the outputs). ``replay`` recomputes every case from the
stored inputs on this machine and judges the difference with the tolerances of the pair of
environments (:func:`pair_tolerances`): bit-level on the same stack, the cross-backend table
between CPUs, set (unmeasured, documented) values for GPU and TPU pairs.

Records are deterministic on a machine: the npz is written with fixed zip timestamps and sorted
entries, and the JSON differs between two recordings only in ``created``. Only one-device runs
are recorded (``mesh`` says so); see docs/parity_records.md.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import time
import zipfile
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import numpy as np

from diptych.core.backend import available_backends, get_backend
from diptych.core.hf import spec_from_config, tiny_spec_for
from diptych.core.model_types import DECODER_MODEL_TYPES, is_recurrent, model_type_of
from diptych.core.recurrent_spec import initial_state_noise, tiny_recurrent_spec
from diptych.core.sampling import SamplingConfig, parity_noise
from diptych.parity.harness import TOLERANCES, Case, Report, compare, left_padded_batch
from diptych.parity.recurrent_suite import DEPTHS, depth_outputs
from diptych.parity.train_suite import CASES as TRAIN_CASES
from diptych.parity.train_suite import case_inputs, run_case
from diptych.recurrent.parity_suite import logits_tolerance_scale

FORMAT = "diptych-parity-record"
FORMAT_VERSION = 1
"""Bump when a field changes meaning; ``replay`` refuses any other version (exit 2)."""

RECORD_JSON = "record.json"
ARRAYS = "arrays.npz"
RECORD_STEPS = 3
"""Optimizer steps of each training case in a record (weights and loss after step 1 and after this one)."""
FULL_LIMIT = 1 << 17
"""Outputs with more entries than this are stored as a fixed sample plus statistics and a checksum."""
SAMPLE_SIZE = 4096
LENGTHS = (7, 12, 3, 9)
SMALL_DECODER = dict(vocab_size=64, hidden_size=32, intermediate_size=64)
SMALL_RECURRENT = dict(n_embd=32, n_heads=4, intermediate_size=64, vocab_size=64, n_layers_in_recurrent_block=1,
                       mean_recurrence=4, mean_backprop_depth=2)
SAMPLING = SamplingConfig(max_new_tokens=6, temperature=1.0, n=2, eos_ids=())
QUANTITIES = ("logits", "logprobs", "grads", "loss", "weights", "tokens")


class RecordError(ValueError):
    """A record that cannot be written, read or replayed here, with what to do about it."""


# -- tolerances by pair -----------------------------------------------------------------------------
def _tol(logits: float, logprobs: float, grads: float, loss: float, weights: float, tokens: float) -> dict[str, float]:
    return dict(zip(QUANTITIES, (logits, logprobs, grads, loss, weights, tokens)))


@dataclass(frozen=True)
class Pair:
    """The tolerances a replay is judged by, for one pair of environments; ``measured`` False means a set value
    that no run has confirmed yet (docs/parity_records.md lists which)."""

    name: str
    measured: bool
    tol: dict[str, float]


SAME_STACK = Pair("same stack", True, _tol(1e-7, 1e-7, 1e-7, 1e-7, 1e-7, 0.0))
PAIRS: dict[str, Pair] = {
    "cpu-cpu fp32": Pair("cpu-cpu fp32", True, {**TOLERANCES["float32"], "tokens": 0.0}),
    # measured torch -> jax: llama logits 2.0e-3, recurrent logits 2.3e-2 (3 bf16 ulps at |logit| ~2), grads 1.2e-2
    "cpu-cpu bf16": Pair("cpu-cpu bf16", True, _tol(3e-2, 3e-2, 3e-2, 2e-2, 2e-2, 0.25)),
    "cpu-gpu fp32 (TF32 off)": Pair("cpu-gpu fp32 (TF32 off)", False, _tol(1e-4, 1e-4, 1e-3, 1e-4, 1e-4, 0.0)),
    "tf32": Pair("tf32", False, _tol(1e-2, 1e-2, 2e-2, 1e-2, 1e-2, 0.25)),
    "cpu-gpu bf16": Pair("cpu-gpu bf16", False, _tol(5e-2, 5e-2, 6e-2, 4e-2, 4e-2, 0.25)),
    "tpu default precision": Pair("tpu default precision", False, _tol(5e-2, 5e-2, 6e-2, 4e-2, 4e-2, 0.25)),
}
"""Relative error for grads, loss and weights, max abs for logits and log-probs, and for tokens the fraction of
sampled positions allowed to differ. GPU and TPU rows are set values: no record has been made there yet."""

# What must match for a replay to be held to SAME_STACK.
_STACK_KEYS = ("backend", "device_kind", "device_name", "threads", "matmul_precision", "tf32", "versions", "kernels")


def precision_class(env: dict[str, Any], dtype: str) -> str:
    """``fp32``, ``tf32``, ``bf16`` or ``tpu-default``: how an environment really multiplies float32 matrices."""
    if dtype == "bfloat16":
        return "bf16"
    if env["device_kind"] == "tpu" and env.get("matmul_precision") not in ("highest", "float32"):
        return "tpu-default"
    if env["device_kind"] == "gpu" and env.get("tf32"):
        return "tf32"
    return "fp32"


def pair_tolerances(recorded: dict[str, Any], here: dict[str, Any], dtype: str) -> Pair:
    """The tolerances for replaying a record made in environment ``recorded`` in environment ``here``."""
    if all(recorded.get(k) == here.get(k) for k in _STACK_KEYS):
        return SAME_STACK
    classes = {precision_class(recorded, dtype), precision_class(here, dtype)}
    cpu_only = recorded["device_kind"] == here["device_kind"] == "cpu"
    if "tpu-default" in classes:
        return PAIRS["tpu default precision"]
    if "tf32" in classes:
        return PAIRS["tf32"]
    if "bf16" in classes:
        return PAIRS["cpu-cpu bf16" if cpu_only else "cpu-gpu bf16"]
    return PAIRS["cpu-cpu fp32" if cpu_only else "cpu-gpu fp32 (TF32 off)"]


# -- the environment --------------------------------------------------------------------------------
def _version(dist: str) -> str | None:
    try:
        return importlib_metadata.version(dist)
    except importlib_metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(backend: str, model: Any = None) -> dict[str, Any]:
    """Where a backend computes: device kind, name and count, mesh, matmul precision, TF32, threads, versions."""
    env: dict[str, Any] = {"backend": backend, "mesh": {"devices": 1, "axes": {"fsdp": 1}}}
    dists = ["numpy", "diptych"] + (["jax", "jaxlib", "flax", "optax"] if backend == "jax" else ["torch"])
    env["versions"] = {"python": platform.python_version(), **{d: _version(d) for d in dists}}
    if backend == "jax":  # lazy: the framework is imported only for its own record
        import jax

        dev = jax.devices()[0]
        env["device_kind"] = dev.platform if dev.platform in ("cpu", "tpu") else "gpu"
        env["device_name"] = cpu_model() if dev.platform == "cpu" else dev.device_kind
        env["visible_devices"] = jax.device_count()
        precision = jax.config.jax_default_matmul_precision
        env["matmul_precision"] = str(precision) if precision else "default"
        env["tf32"] = env["device_kind"] == "gpu" and env["matmul_precision"] not in ("highest", "float32")
        env["threads"] = os.cpu_count()
    elif backend == "torch":
        import torch

        on_gpu = torch.cuda.is_available()
        env["device_kind"] = "gpu" if on_gpu else "cpu"
        env["device_name"] = torch.cuda.get_device_name(0) if on_gpu else cpu_model()
        env["visible_devices"] = torch.cuda.device_count() if on_gpu else 1
        env["matmul_precision"] = torch.get_float32_matmul_precision()
        env["tf32"] = on_gpu and (bool(torch.backends.cuda.matmul.allow_tf32) or env["matmul_precision"] != "highest")
        env["threads"] = torch.get_num_threads()
    else:
        env.update(device_kind="cpu", device_name=cpu_model(), visible_devices=1, matmul_precision="unknown",
                   tf32=False, threads=os.cpu_count())
    env["kernels"] = getattr(model, "kernels", None)
    return env


# -- models and inputs ------------------------------------------------------------------------------
def weights_sha256(weights: dict[str, np.ndarray]) -> str:
    """A content hash of canonical weights (names, shapes and float32 bytes, in name order)."""
    h = hashlib.sha256()
    for name in sorted(weights):
        a = np.ascontiguousarray(weights[name], np.float32)
        h.update(f"{name}:{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def folder_sha256(folder: str | os.PathLike[str]) -> str:
    """A content hash of an HF folder's ``config.json`` and safetensors files (names and bytes, in name order)."""
    h = hashlib.sha256()
    for f in sorted(Path(folder).iterdir()):
        if f.name == "config.json" or f.name.endswith((".safetensors", ".safetensors.index.json")):
            h.update(f.name.encode() + b"\0")
            h.update(f.read_bytes())
    return h.hexdigest()


def default_models(model_type: str = "llama", seed: int = 0) -> list[dict[str, Any]]:
    """The models a record made without a checkpoint holds: the small tiny model of ``model_type`` and, when that
    is a decoder, the small tiny recurrent-depth model too, so that one record covers every case."""
    if model_type in DECODER_MODEL_TYPES:
        specs = [tiny_spec_for(model_type, **SMALL_DECODER), tiny_recurrent_spec(**SMALL_RECURRENT)]
    else:
        specs = [tiny_spec_for(model_type)]
    return [{"spec": s, "seed": seed} for s in specs]


def _model_key(spec: Any) -> str:
    return model_type_of(spec) or ("recurrent" if is_recurrent(spec) else "decoder")


def _inputs_for(spec: Any, seed: int) -> dict[str, np.ndarray]:
    """Every input of a model's cases, drawn once at record time and stored (replay never redraws them)."""
    tokens, mask = left_padded_batch(spec.vocab_size, list(LENGTHS), seed)
    out = {"tokens": tokens, "mask": mask}
    if is_recurrent(spec):
        out["init_state"] = initial_state_noise(spec, (*tokens.shape, spec.n_embd), np.random.default_rng(seed + 1))
        out["coef"] = np.random.default_rng(seed).standard_normal(tokens.shape).astype(np.float32) * mask
        return out
    rng = np.random.default_rng(seed + 2)
    prompts = [rng.integers(3, spec.vocab_size, size=n) for n in (5, 3)]
    out["sample_prompts"] = np.zeros((len(prompts), max(map(len, prompts))), np.int32)
    for i, p in enumerate(prompts):
        out["sample_prompts"][i, : len(p)] = p
    out["sample_prompt_lengths"] = np.asarray([len(p) for p in prompts], np.int32)
    out["sample_noise"] = parity_noise(len(prompts) * SAMPLING.n, SAMPLING.max_new_tokens, spec.vocab_size, seed)
    for case in TRAIN_CASES:
        for k, v in case_inputs(case, spec.vocab_size).items():
            out[f"{case}.{k}"] = np.asarray(v)
    return out


# -- the cases --------------------------------------------------------------------------------------
@dataclass
class Output:
    """One recorded quantity: ``quantity`` names the case; ``mask`` an input that selects the judged entries."""

    quantity: str
    value: np.ndarray
    mask: str | None = None
    scale: float = 1.0


def compute(backend: str, spec: Any, weights: dict[str, np.ndarray], inputs: dict[str, np.ndarray], dtype: str,
            steps: int) -> tuple[list[Output], Any]:
    """Every case of one model on one backend from stored ``inputs``: what ``record`` writes and ``replay``
    recomputes. Returns the outputs and the built model (for its kernels mode)."""
    be = get_backend(backend)
    tag = _model_key(spec)
    tokens, mask = inputs["tokens"], inputs["mask"]
    if is_recurrent(spec):
        got = depth_outputs(backend, spec, weights, dtype, tokens, mask, inputs["init_state"], inputs["coef"],
                            depths=DEPTHS, num_grad_steps=int(spec.mean_backprop_depth))
        r, k = max(DEPTHS), min(int(spec.mean_backprop_depth), max(DEPTHS))
        outs = [Output(f"logits:{tag} r={d}", got[f"logits@{d}"], "mask", logits_tolerance_scale(spec, d))
                for d in DEPTHS]
        outs += [Output(f"logits:{tag} truncated (r={r},k={k})", got["truncated_logits"], "mask",
                        logits_tolerance_scale(spec, r)),
                 Output(f"loss:{tag} truncated (r={r},k={k})", got["loss"]),
                 Output(f"grads:{tag} truncated (r={r},k={k})", got["grads"])]
        return outs, None
    model = be.build(spec, weights, dtype=dtype)
    targets = np.roll(tokens, -1, axis=1)
    outs = [
        Output(f"logits:{tag} model", be.to_numpy(be.forward(model, be.from_numpy(tokens), be.from_numpy(mask))),
               "mask"),
        Output(f"logprobs:{tag} model", be.to_numpy(be.logprobs(model, be.from_numpy(tokens), be.from_numpy(mask),
                                                                be.from_numpy(targets), 1.0)), "mask"),
    ]
    prompts = [row[:n].tolist() for row, n in zip(inputs["sample_prompts"], inputs["sample_prompt_lengths"])]
    roll = be.generate(model, prompts, SAMPLING, noise=inputs["sample_noise"])
    outs.append(Output(f"tokens:{tag} parity sample", np.asarray(roll.completion_tokens, np.int64), "sample_mask"))
    outs.append(Output(f"logprobs:{tag} parity sample", np.asarray(roll.logprobs, np.float32), "sample_mask"))
    outs.append(Output("_sample_mask", np.asarray(roll.completion_mask, np.int32)))
    for case in TRAIN_CASES if model_type_of(spec) in DECODER_MODEL_TYPES else ():
        batch = {k.split(".", 1)[1]: v for k, v in inputs.items() if k.startswith(f"{case}.")}
        got = run_case(case, be, spec, weights, dtype, steps=steps, batch=batch)
        if got["grads"] is not None:
            outs.append(Output(f"grads:{tag} {case} step 1", got["grads"]))
        for step in sorted({1, steps}):
            outs.append(Output(f"loss:{tag} {case} step {step}", np.asarray(got[f"loss@{step}"], np.float64)))
            outs.append(Output(f"weights:{tag} {case} after {step}", got[f"weights@{step}"]))
    return outs, model


# -- storage ----------------------------------------------------------------------------------------
def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(a, order="C").tobytes()).hexdigest()


def _sample_index(n: int) -> np.ndarray:
    return np.sort(np.random.default_rng(0).choice(n, SAMPLE_SIZE, replace=False))


def _stored(a: np.ndarray) -> tuple[np.ndarray, str]:
    """What is written for an output: itself, or for a big one a fixed sample of its entries."""
    flat = np.asarray(a).ravel()
    if flat.size <= FULL_LIMIT:
        return np.asarray(a), "full"
    return flat[_sample_index(flat.size)], "sampled"


def _storage_dtype(a: np.ndarray) -> np.ndarray:
    """Floats as float32 (every backend computes in float32 at most; float64 here is only a widened copy)."""
    a = np.asarray(a)
    return a.astype(np.float32) if np.issubdtype(a.dtype, np.floating) else a


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """A compressed npz that ``np.load`` reads, byte-identical for identical arrays (fixed zip timestamps)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asarray(arrays[name], order="C"), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())


# -- record -----------------------------------------------------------------------------------------
def record(folder: str | os.PathLike[str], backend: str, models: list[dict[str, Any]] | None = None, *,
           dtype: str = "float32", steps: int = RECORD_STEPS) -> Path:
    """Run every case on ``backend`` and write a record to ``folder`` (created; an existing record is replaced).

    ``models``: ``{"spec", "weights"?, "seed"?, "checkpoint"?}`` dicts (default :func:`default_models`); a
    checkpoint's weights are identified by the folder's content hash, the others by their numpy seed."""
    if dtype not in TOLERANCES:
        raise RecordError(f"dtype must be one of {', '.join(TOLERANCES)}, got {dtype!r}.")
    if steps < 1:
        raise RecordError(f"steps must be >= 1, got {steps}.")
    folder = Path(folder)
    arrays: dict[str, np.ndarray] = {}
    entries, cases = [], []
    built = None
    for m_i, m in enumerate(models or default_models()):
        spec = m["spec"]
        seed = int(m.get("seed", 0))
        weights = m.get("weights") or spec.init_weights(seed)
        key = f"m{m_i}"
        entry: dict[str, Any] = {"key": key, "name": _model_key(spec), "config": spec.to_hf_config(),
                                 "weights_sha256": weights_sha256(weights), "input_seed": seed}
        if m.get("checkpoint"):
            entry["checkpoint"] = {"path": str(m["checkpoint"]), "sha256": folder_sha256(m["checkpoint"])}
        else:
            entry["weight_seed"] = seed
        inputs = _inputs_for(spec, seed)
        for name, a in inputs.items():
            arrays[f"{key}.in.{name}"] = _storage_dtype(a)
        outs, model = compute(backend, spec, weights, inputs, dtype, steps)
        built = built or model
        extra = {o.quantity[1:]: o.value for o in outs if o.quantity.startswith("_")}
        for name, a in extra.items():
            arrays[f"{key}.in.{name}"] = _storage_dtype(a)
        for o in (o for o in outs if not o.quantity.startswith("_")):
            value = _storage_dtype(o.value)
            stored, storage = _stored(value)
            name = f"{key}.out.{len(cases):03d}"
            arrays[name] = stored
            cases.append({"quantity": o.quantity, "model": key, "array": name, "mask": o.mask and f"{key}.in.{o.mask}",
                          "shape": list(value.shape), "storage": storage, "sha256": _sha(value), "scale": o.scale})
        entries.append(entry)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                          time.gmtime()),
            "dtype": dtype, "steps": steps, "environment": environment(backend, built), "models": entries,
            "cases": cases}
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{ARRAYS}.tmp"
    write_npz(tmp, arrays)
    os.replace(tmp, folder / ARRAYS)
    (folder / RECORD_JSON).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return folder


def record_backends(folder: str | os.PathLike[str], backends: list[str] | None = None,
                    models: list[dict[str, Any]] | None = None, **kw: Any) -> list[Path]:
    """One record per backend, in ``folder/<backend>`` (every installed backend by default)."""
    chosen = backends or available_backends()
    if not chosen:
        raise RecordError("No backend is installed: pip install 'diptych[jax]' or 'diptych[torch]'.")
    return [record(Path(folder) / b, b, models, **kw) for b in chosen]


# -- replay -----------------------------------------------------------------------------------------
def find_records(folder: str | os.PathLike[str]) -> list[Path]:
    """``folder`` itself when it is a record, else its sub-folders that are, in name order."""
    folder = Path(folder)
    if (folder / RECORD_JSON).is_file():
        return [folder]
    found = sorted(p.parent for p in folder.glob(f"*/{RECORD_JSON}")) if folder.is_dir() else []
    if not found:
        raise RecordError(f"{folder} holds no parity record ({RECORD_JSON}); make one with "
                          f"`diptych parity --record {folder}`.")
    return found


def load_record(folder: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(metadata, arrays)`` of a record, refusing another format or format version."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / RECORD_JSON).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RecordError(f"{folder / RECORD_JSON} is not a readable parity record: {e}") from None
    if not isinstance(meta, dict):
        raise RecordError(f"{folder / RECORD_JSON} is not a parity record (a JSON object was expected).")
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise RecordError(f"{folder} is a record of format {meta.get('format')!r} version "
                          f"{meta.get('format_version')!r}; this diptych reads {FORMAT!r} version {FORMAT_VERSION} "
                          "only: replay it with the diptych that wrote it, or record it again.")
    try:
        with np.load(folder / ARRAYS, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise RecordError(f"{folder / ARRAYS} cannot be read: {e}") from None
    return meta, arrays


def _model_weights(entry: dict[str, Any], checkpoint: str | os.PathLike[str] | None) -> tuple[Any, dict]:
    spec = spec_from_config(entry["config"])
    if "checkpoint" in entry:
        if checkpoint is None:
            raise RecordError(f"the record was made from the HF folder {entry['checkpoint']['path']} (sha256 "
                              f"{entry['checkpoint']['sha256'][:12]}...); pass it with --checkpoint FOLDER.")
        from diptych.core.hf import load_hf_folder

        if folder_sha256(checkpoint) != entry["checkpoint"]["sha256"]:
            raise RecordError(f"{checkpoint} is not the folder the record was made from (content hash differs).")
        spec, weights = load_hf_folder(checkpoint)
    else:
        weights = spec.init_weights(int(entry["weight_seed"]))
    if weights_sha256(weights) != entry["weights_sha256"]:
        raise RecordError(f"the weights of model {entry['name']} rebuilt here differ from the recorded ones "
                          "(weights_sha256); the record cannot be replayed with this diptych.")
    return spec, weights


def _judge(c: dict[str, Any], rec: np.ndarray, got: np.ndarray, mask: np.ndarray | None, pair: Pair,
           dtype: str, a: str, b: str) -> Case:
    quantity = c["quantity"]
    kind = quantity.split(":")[0]
    got = _storage_dtype(got)  # judged as stored, so the same stack compares bit for bit
    tol = pair.tol[kind] * (c.get("scale", 1.0) if pair is not SAME_STACK else 1.0)
    if list(got.shape) != c["shape"]:
        return Case(quantity, a, b, dtype, float("inf"), float("inf"), tol, False,
                    f"shape {tuple(c['shape'])} recorded vs {got.shape}")
    if c["storage"] == "sampled":
        got = np.asarray(got).ravel()[_sample_index(got.size)]
        mask = None
    if kind == "tokens":
        return _judge_tokens(quantity, rec, got, mask, tol, dtype, a, b)
    case = compare(quantity, a, b, got, rec, dtype, tol=tol, mask=mask)
    if case.passed and c["storage"] == "full" and _sha(got) == c["sha256"]:
        case.note = "bit-identical"
    return case


def _judge_tokens(quantity: str, rec: np.ndarray, got: np.ndarray, mask: np.ndarray | None, tol: float,
                  dtype: str, a: str, b: str) -> Case:
    """Sampled tokens: ``max_abs`` counts differing positions, ``max_rel`` is their fraction (judged)."""
    m = np.ones(rec.shape, bool) if mask is None else np.asarray(mask, bool)
    differ = int(((rec != got) & m).sum())
    frac = differ / max(int(m.sum()), 1)
    return Case(quantity, a, b, dtype, float(differ), frac, tol, frac <= tol,
                "identical" if differ == 0 else f"{differ} sampled tokens differ")


def _prefix_mask(rec: np.ndarray, got: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Positions up to and including the first differing token of each row: where sampler log-probs compare."""
    same = np.cumprod(rec == got, axis=1).astype(bool)
    first = np.concatenate([np.ones((rec.shape[0], 1), bool), same[:, :-1]], axis=1)
    return first & np.asarray(mask, bool)


def replay(folder: str | os.PathLike[str], backends: list[str] | None = None, *,
           checkpoint: str | os.PathLike[str] | None = None) -> tuple[Report, list[str]]:
    """Recompute every case of the record(s) in ``folder`` here and compare: ``(report, header lines)``.

    Each record is replayed on ``backends`` (default: the backend that made it when installed here, else every
    installed one) in the record's dtype, from the stored inputs."""
    report, lines = Report(), []
    installed = available_backends()
    for path in find_records(folder):
        meta, arrays = load_record(path)
        rec_env, dtype, steps = meta["environment"], meta["dtype"], int(meta["steps"])
        chosen = backends or ([rec_env["backend"]] if rec_env["backend"] in installed else installed)
        missing = [b for b in chosen if b not in installed]
        if missing or not chosen:
            raise RecordError(f"backend {', '.join(missing) or rec_env['backend']} is not installed here: pip install "
                              f"'diptych[{(missing or [rec_env['backend']])[0]}]' or pick another with --backend.")
        models = {e["key"]: (e, *_model_weights(e, checkpoint)) for e in meta["models"]}
        a = f"record:{rec_env['backend']}/{rec_env['device_kind']}"
        for backend in chosen:
            outputs: dict[str, np.ndarray] = {}
            here = None
            for key, (_entry, spec, weights) in models.items():
                prefix = f"{key}.in."
                inputs = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
                outs, model = compute(backend, spec, weights, inputs, dtype, steps)
                here = here or (model and environment(backend, model))
                outputs.update({f"{key}:{o.quantity}": np.asarray(o.value) for o in outs})
            here = here or environment(backend)
            pair = pair_tolerances(rec_env, here, dtype)
            b = f"{backend}/{here['device_kind']}"
            lines.append(f"replaying {path} (made by {rec_env['backend']} on {rec_env['device_kind']} "
                         f"{rec_env['device_name']}, {dtype}, {meta['created']}) with {backend} on "
                         f"{here['device_kind']} {here['device_name']}: tolerances '{pair.name}'"
                         + ("" if pair.measured else " (set values, not yet measured)"))
            for c in meta["cases"]:
                got = outputs.get(f"{c['model']}:{c['quantity']}")
                if got is None:
                    report.cases.append(Case(c["quantity"], a, b, dtype, float("inf"), float("inf"), 0.0, False,
                                             "not computed here"))
                    continue
                rec = arrays[c["array"]]
                mask = arrays[c["mask"]] if c.get("mask") else None
                if c["quantity"].startswith("logprobs:") and "sample" in c["quantity"]:
                    tok = next(x for x in meta["cases"] if x["quantity"] == c["quantity"].replace("logprobs:",
                                                                                                   "tokens:", 1)
                               and x["model"] == c["model"])
                    got_tok = outputs[f"{c['model']}:{tok['quantity']}"]
                    if got_tok.shape == arrays[tok["array"]].shape:
                        mask = _prefix_mask(arrays[tok["array"]], got_tok, mask)
                report.cases.append(_judge(c, rec, got, mask, pair, dtype, a, b))
    return report, lines


def main_record(folder: Path, backends: list[str] | None, models: list[dict[str, Any]], dtype: str) -> int:
    """`diptych parity --record DIR`: one line per record written."""
    for path in record_backends(folder, backends, models, dtype=dtype):
        size = sum(f.stat().st_size for f in path.iterdir())
        print(f"recorded {path} ({size / 1024:.0f} KiB)")
    return 0
