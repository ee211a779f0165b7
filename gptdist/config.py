"""The run config: a YAML recipe plus dotted `key=value` overrides, validated before any process group exists.

    cfg = load_config("configs/tiny-cpu.yaml", ["train.steps=50", "parallel.zero_stage=2"])

Every problem is raised as a UserError whose one line names the key, the value and what is allowed.
Checks that need the world size (the layout, the batch arithmetic) live in `Layout.resolve`.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple
from urllib.parse import unquote

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gptdist.data.config import DataConfig, SourceSpec, source_list
from gptdist.errors import UserError
from gptdist.model.config import GPTConfig


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, validate_assignment=True)


class ParallelConfig(_Section):
    tp: int = Field(1, ge=1, description="tensor-parallel size")
    pp: int = Field(1, ge=1, description="pipeline-parallel size (stages)")
    zero_stage: int = Field(0, ge=0, le=3, description="ZeRO stage of the data-parallel optimizer")
    activation_checkpointing: bool = Field(False, description="recompute each block's activations in backward")

    @model_validator(mode="after")
    def _zero_fits_pipeline(self) -> "ParallelConfig":
        if self.pp > 1 and self.zero_stage > 1:
            raise ValueError(
                f"zero_stage={self.zero_stage} cannot be combined with pp={self.pp}: DeepSpeed's pipeline engine "
                "supports only ZeRO stages 0 and 1 (stages 2 and 3 partition gradients/parameters across the "
                "micro-batches the pipeline keeps in flight); use parallel.zero_stage=1"
            )
        return self


class TrainConfig(_Section):
    steps: int = Field(100, ge=1, le=10**12, description="optimizer steps to train")
    micro_batch_size: int = Field(8, ge=1, le=1 << 20, description="samples per rank per forward/backward")
    global_batch_size: Optional[int] = Field(
        None, ge=1, description="samples per optimizer step over all ranks (default micro_batch_size * dp)"
    )
    lr: float = Field(6e-4, gt=0, description="peak learning rate")
    min_lr: float = Field(6e-5, ge=0, description="learning rate at the end of the decay")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up from 0 to lr")
    decay: Literal["cosine", "linear", "constant"] = Field("cosine", description="schedule after warm-up")
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, ge=0, description="max global gradient norm; 0 disables clipping")
    seed: int = Field(1234, ge=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on GPUs that support it, fp32 on CPU"
    )
    log_every: int = Field(10, ge=1, description="optimizer steps between host syncs that write metrics")
    max_bad_steps: int = Field(10, ge=1, description="consecutive non-finite losses tolerated before stopping")
    peak_flops: Optional[float] = Field(None, gt=0, description="per-device peak FLOP/s for MFU (default: "
                                        "measured/datasheet)")
    deepspeed_config: Optional[str] = Field(None, description="a DeepSpeed JSON merged over the generated one")

    @model_validator(mode="after")
    def _lr_order(self) -> "TrainConfig":
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr={self.min_lr} must not exceed lr={self.lr}")
        return self


class RunSection(_Section):
    dir: str = Field("runs/default", min_length=1, description="run directory: checkpoints, metrics, MLflow store")
    name: Optional[str] = Field(None, description="MLflow run name (default: the run directory's name)")


class TrackingConfig(_Section):
    enabled: bool = True
    uri: Optional[str] = Field(None, description="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else SQLite in "
                               "run.dir)")
    experiment: str = Field("gptdist", min_length=1)
    on_unreachable: Literal["warn", "fail"] = Field("warn", description="tracking server down: train on, or stop")
    system_metrics: bool = Field(True, description="MLflow's system metrics (CPU, memory, GPU) of rank 0's node")
    system_metrics_interval_s: float = Field(10.0, gt=0, description="seconds between system metric samples")
    flush_timeout_s: float = Field(60.0, ge=0, description="at the end, how long to keep sending metrics a "
                                                           "tracking outage held back")


class CheckpointConfig(_Section):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, validate_assignment=True, populate_by_name=True)

    every: int = Field(0, ge=0, description="save every N optimizer steps (0: only at the end)")
    keep: int = Field(3, ge=1, description="newest complete checkpoints kept")
    at_end: bool = True
    async_: bool = Field(True, alias="async", description="training waits only for a snapshot of the state; a "
                                                          "background thread writes it (false: the step waits for "
                                                          "the whole write)")
    max_failed_saves: int = Field(3, ge=1, description="consecutive saves that may fail (a full disk) before the run "
                                                       "stops with exit status 4")


class ProfileConfig(_Section):
    memory: bool = Field(True, description="per-rank memory report in RUN_DIR/memory/rank_<r>.json "
                                           "(telemetry/memory.py)")
    memory_step: int = Field(2, ge=1, description="the optimizer step whose model states (and, on CPU, traced peak of "
                                                  "live tensor bytes) the memory report records")
    comms: bool = Field(False, description="DeepSpeed's comms logger: collectives per rank in RUN_DIR/profile/")
    pipeline: bool = Field(False, description="time every pipeline instruction per step, in RUN_DIR/profile/")


class EvalConfig(_Section):
    """Validation during training: the mean next-token loss over eval.max_samples windows spread evenly over a held-out
    source, read as `gptdist eval CHECKPOINT --data SOURCE --max-samples N` reads them (train/validation.py)."""

    data: Optional[List[SourceSpec]] = Field(None, description="held-out text: one source, in any form data.sources "
                                                               "takes (file, glob, folder, pkg://, hub name)")
    every: int = Field(0, ge=0, description="optimizer steps between validations (0: never during training)")
    max_samples: int = Field(64, ge=1, description="windows of seq_len+1 tokens per validation, spread over the "
                                                   "data-parallel ranks")
    at_end: bool = Field(True, description="validate after the last step (when eval.data is set)")

    @field_validator("data", mode="before")
    @classmethod
    def _short_forms(cls, value: object) -> object:
        value = source_list(value)
        if isinstance(value, list) and len(value) != 1:
            raise ValueError(f"holds {len(value)} sources; validation reads one held-out source (a glob or "
                                 "folder can hold many files)")
        return value

    @model_validator(mode="after")
    def _data_for_every(self) -> "EvalConfig":
        if self.every and not self.data:
            raise ValueError(f"eval.every={self.every} needs eval.data, a held-out source (a file, glob, folder or "
                             "hub name) that training does not read")
        return self

    @property
    def source(self) -> Optional[SourceSpec]:
        return self.data[0] if self.data else None

    @property
    def enabled(self) -> bool:
        return self.source is not None and (self.every > 0 or self.at_end)


class RunConfig(_Section):
    model: GPTConfig = Field(default_factory=GPTConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    run: RunSection = Field(default_factory=RunSection)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    profile: ProfileConfig = Field(default_factory=ProfileConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    resume: str = Field(
        "auto", min_length=1,
        description="'auto': continue from run.dir's newest complete checkpoint, if any; 'never': refuse a run.dir "
                    "with checkpoints; or the path of a run directory or checkpoint to start from",
    )

    def to_dict(self) -> Dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)  # checkpoint.async, not the attribute's async_

    def digest(self) -> str:
        """A short hash of the resolved config, stored in checkpoints."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------------
# Loading: YAML file -> dict -> overrides -> validated RunConfig


def load_config(path: Optional[str | Path], overrides: Sequence[str] = ()) -> RunConfig:
    raw: Dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml(Path(path))
    for item in overrides:
        _apply_override(raw, item)
    # The run directory defaults to runs/<recipe name>, so two recipes never share one by accident.
    if raw.get("run") is None:
        raw["run"] = {}
    if isinstance(raw["run"], dict):
        raw["run"].setdefault("dir", f"runs/{Path(path).stem if path is not None else 'default'}")
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as err:
        raise UserError(_describe(err, raw)) from None
    lift_credentials(cfg)
    return cfg


# ----------------------------------------------------------------------------------------------------------------
# Credentials in a tracking URI: taken out of the config (and of $MLFLOW_TRACKING_URI) into the variables MLflow
# reads them from, so that config.yaml, checkpoints, MLflow params/tags and logs only ever see the URI without them.

_USERINFO = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/?#@]*)@(?P<rest>.*)$", re.DOTALL)


def split_credentials(uri: str) -> Tuple[str, Dict[str, str]]:
    """'http://alice:pw@host:5000' -> ('http://host:5000', {MLFLOW_TRACKING_USERNAME: alice, ..._PASSWORD: pw});
    'https://TOKEN@host' -> ('https://host', {MLFLOW_TRACKING_TOKEN: TOKEN}); a URI without credentials unchanged."""
    match = _USERINFO.match(uri)
    if match is None:
        return uri, {}
    user, colon, password = match.group("userinfo").partition(":")
    if colon:
        found = {"MLFLOW_TRACKING_USERNAME": unquote(user), "MLFLOW_TRACKING_PASSWORD": unquote(password)}
    else:
        found = {"MLFLOW_TRACKING_TOKEN": unquote(user)}
    return match.group("scheme") + match.group("rest"), {k: v for k, v in found.items() if v}


def lift_credentials(cfg: RunConfig, env: Optional[Dict[str, str]] = None) -> None:
    """Moves credentials out of tracking.uri and $MLFLOW_TRACKING_URI into this process's environment (where
    MLflow's client reads them, and where the ranks a launcher starts inherit them)."""
    env = os.environ if env is None else env  # type: ignore[assignment]
    if env.get("MLFLOW_TRACKING_URI"):
        bare, found = split_credentials(env["MLFLOW_TRACKING_URI"])
        env["MLFLOW_TRACKING_URI"] = bare
        env.update(found)
    if cfg.tracking.uri:
        bare, found = split_credentials(cfg.tracking.uri)
        cfg.tracking.uri = bare
        env.update(found)


def _read_yaml(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        raise UserError(f"config file {path} not found: pass the path of a YAML recipe, e.g. configs/tiny-cpu.yaml")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_StrictLoader)  # a SafeLoader
    except _Refused as exc:
        raise UserError(f"config file {path} {exc}") from None
    except RecursionError:
        raise UserError(f"config file {path} nests lists or mappings too deeply to read; a recipe is a few sections "
                        "of keys and values") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" line {where.line + 1}" if where is not None else ""
        raise UserError(f"config file {path}{line} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of sections (model:, train:, ...), not "
                        f"{type(data).__name__}")
    return data


class _Refused(Exception):
    """A YAML construct a recipe may not use; the message says where and what to write instead."""


class _StrictLoader(yaml.SafeLoader):
    """yaml.safe_load, less what hides a mistake: a key given twice (the second silently won), and anchors and
    aliases (a few lines of nested aliases expand to gigabytes; a recipe spells each value out)."""

    def compose_node(self, parent, index):  # type: ignore[override]
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise _Refused(f"line {mark.line + 1}: YAML aliases (*name) are not allowed in a recipe; write the value "
                           "out in full")
        event = self.peek_event()
        if getattr(event, "anchor", None):
            raise _Refused(f"line {event.start_mark.line + 1}: YAML anchors (&{event.anchor[:40]}) are not allowed "
                           "in a recipe; write each value out in full")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):  # type: ignore[override]
        seen: Dict[Any, int] = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                key = key_node.value
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise _Refused(f"line {line}: key {key[:60]!r} is given twice (first on line {seen[key]}); keep "
                                   "one of them")
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _apply_override(raw: Dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise UserError(f"override {item!r} must look like section.key=value, e.g. train.steps=100")
    try:
        value = yaml.load(text, Loader=_StrictLoader) if text.strip() else None
    except _Refused as exc:
        raise UserError(f"override {key}=...: {str(exc).split(': ', 1)[-1]}") from None
    except RecursionError:
        raise UserError(f"override {key}=...: the value nests lists or mappings too deeply to read") from None
    except yaml.YAMLError:
        value = text
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise UserError(f"override {item!r}: {part} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _describe(err: ValidationError, raw: Dict[str, Any]) -> str:
    """One line for the first problem: the dotted key, the value given, and what is allowed."""
    first = err.errors()[0]
    loc = [str(p) for p in first["loc"]]
    key = ".".join(loc) if loc else "config"
    if first["type"] == "extra_forbidden":
        known = _known_keys(loc[:-1])
        hint = difflib.get_close_matches(loc[-1], known, n=1)
        suggestion = f"; did you mean {'.'.join(loc[:-1] + [hint[0]])}?" if hint else ""
        allowed = f" (known keys: {', '.join(sorted(known))})" if known and not hint else ""
        return f"config error: unknown key {key}{suggestion}{allowed}"
    msg = first["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if first["type"] in ("value_error", "assertion_error") or "input" not in first:
        return f"config error: {key}: {msg}"
    given = repr(first["input"])
    given = given if len(given) <= 80 else f"{given[:70]}...({len(given)} characters)"
    if msg == "Input should be a finite number":
        default = _default_of(loc)
        msg += "; write a finite number" + (f" such as the default, {default}" if default is not None else "")
    return f"config error: {key}={given}: {msg}"


def _default_of(loc: List[str]) -> Any:
    model: Any = RunConfig
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part)
        model = field.annotation if field is not None else None
    field = getattr(model, "model_fields", {}).get(loc[-1]) if loc else None
    return getattr(field, "default", None) if field is not None else None


def _known_keys(section_loc: List[str]) -> List[str]:
    model: Any = RunConfig
    for part in section_loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = field.annotation
        # List[SourceSpec] / Optional[...] -> the model inside
        for arg in getattr(model, "__args__", ()) or ():
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                model = arg
        if part.isdigit():
            continue
    return list(getattr(model, "model_fields", {}).keys())


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def config_changes(saved: Dict, current: Dict, prefix: str = "") -> List[str]:
    """'key: old -> new' for every value that differs between two resolved configs (as dicts)."""
    out: List[str] = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_changes(a, b, name + ".")
        elif a != b:
            out.append(f"{name}: {a!r} -> {b!r}")
    return out
