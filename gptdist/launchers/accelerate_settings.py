"""accelerate's training settings in gptdist's terms.

`accelerate launch` hands a few settings to the ranks it starts (ACCELERATE_* variables, see accelerate_env.py),
and an accelerate config YAML holds the same ones (accelerate_config.py). Those that mean something to gptdist
become config keys; the rest are refused, because silently ignoring them would train something else than asked:

    accelerate                           gptdist
    zero_stage                           parallel.zero_stage
    mixed_precision bf16 | fp16          train.precision bf16 | fp16     ('no' from a config file: fp32; fp8 refused)
    gradient_clipping                    train.grad_clip
    deepspeed_config_file                train.deepspeed_config; its "auto" values are left to gptdist, its ZeRO
                                         stage, bf16/fp16 and clipping map as above, its batch sizes must agree
    gradient_accumulation_steps          not a setting here: gptdist derives it (global batch / (micro batch x dp)),
                                         so it is accepted only when equal to what gptdist derives
    offload devices other than none, a dynamo backend, FSDP, Megatron-LM     refused (gptdist does none of them)

The recipe (its YAML file and the command-line overrides) decides: a key it leaves unset takes accelerate's value;
a key it sets must agree with accelerate's, or the run is refused with one line naming both values.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from gptdist.config import RunConfig, load_config
from gptdist.engine.ds_config import read_deepspeed_json
from gptdist.errors import UserError
from gptdist.parallel.layout import Layout

# Checked against the resolved layout instead of set: values gptdist derives from the batch sizes and world size.
DERIVED = {"layout.grad_accum": "gradient accumulation steps", "layout.global_batch_size": "global batch size",
           "layout.micro_batch_size": "micro-batch size"}

# Describes where a value came from, for messages: (accelerate's name for it, its value) -> text.
Describe = Callable[[str, Any], str]


@dataclass(frozen=True)
class Setting:
    key: str      # a gptdist config key ("parallel.zero_stage") or one of DERIVED
    value: Any    # in gptdist's terms (2, "bf16", 0.5, a path)
    source: str   # how the user wrote it: "accelerate zero_stage=2 (ACCELERATE_DEEPSPEED_ZERO_STAGE)"


def settings_from_accelerate(values: Mapping[str, Any], describe: Describe,
                             precision_is_explicit: bool) -> List[Setting]:
    """accelerate's values by accelerate's names (None: not given) -> Settings; refuses what gptdist cannot do.

    precision_is_explicit: mixed_precision came from a config file, where 'no' is a choice (fp32); on the command
    line 'no' is also accelerate's default, which asks for nothing."""
    out: List[Setting] = []

    def given(name: str) -> Optional[str]:
        value = values.get(name)
        if value is None:
            return None
        if value is False and name == "mixed_precision":  # YAML reads an unquoted `mixed_precision: no` as False
            return "no"
        return str(value).strip()

    distributed = given("distributed_type")
    if distributed in ("FSDP", "MEGATRON_LM", "PARALLELISM_CONFIG"):
        what = {"FSDP": "FSDP", "MEGATRON_LM": "Megatron-LM", "PARALLELISM_CONFIG": "accelerate's parallelism config"}
        raise UserError(f"{describe('distributed_type', distributed)}: gptdist does not run under {what[distributed]}; "
                        "it shards with DeepSpeed itself: launch with --use_deepspeed (distributed_type: DEEPSPEED) "
                        "and set parallel.tp, parallel.pp and parallel.zero_stage (3 shards like FSDP)")
    stage = given("zero_stage")
    if stage is not None:
        source = describe("zero_stage", stage)
        out.append(Setting("parallel.zero_stage", _whole(stage, source), source))
    precision = given("mixed_precision")
    if precision is not None:
        wanted = precision.lower()
        source = describe("mixed_precision", precision)
        if wanted in ("bf16", "fp16"):
            out.append(Setting("train.precision", wanted, source))
        elif wanted == "no":
            if precision_is_explicit:
                out.append(Setting("train.precision", "fp32", source))
        elif wanted == "fp8":
            raise UserError(f"{source}: gptdist trains in fp32, bf16 or fp16, not fp8; set accelerate's "
                            "mixed_precision to bf16 or no")
        else:
            raise UserError(f"{source}: unknown mixed precision; expected no, bf16 or fp16")
    clip = given("gradient_clipping")
    if clip is not None and clip.lower() != "none":
        source = describe("gradient_clipping", clip)
        out.append(Setting("train.grad_clip", _number(clip, source), source))
    accum = given("gradient_accumulation_steps")
    if accum is not None:
        source = describe("gradient_accumulation_steps", accum)
        out.append(Setting("layout.grad_accum", _whole(accum, source), source))
    for name in ("offload_optimizer_device", "offload_param_device"):
        device = given(name)
        if device is not None and device.lower() not in ("none", ""):
            _refuse_offload(describe(name, device))
    dynamo = given("dynamo_backend")
    if dynamo is not None and dynamo.upper() not in ("NO", ""):
        raise UserError(f"{describe('dynamo_backend', dynamo)}: gptdist does not compile its model with torch.compile; "
                        "set accelerate's dynamo backend to no")
    ds_file = given("deepspeed_config_file")
    if ds_file:
        source = describe("deepspeed_config_file", ds_file)
        path = str(Path(ds_file).expanduser().resolve())
        out.append(Setting("train.deepspeed_config", path, source))
        out.extend(settings_from_deepspeed_file(path, source))
    return out


def settings_from_deepspeed_file(path: str, source: str) -> List[Setting]:
    """The keys of an accelerate-style DeepSpeed JSON that gptdist sets itself. "auto" (accelerate's "fill this in
    from the script") leaves a value to gptdist."""
    data = read_deepspeed_json(path, source)

    out: List[Setting] = []

    def take(key: str, value: Any, where: str, convert: Callable[[Any, str], Any]) -> None:
        if value is None or value == "auto":
            return
        text = f"{source}: {where}={json.dumps(value)}"
        out.append(Setting(key, convert(value, text), text))

    zero = data.get("zero_optimization")
    if isinstance(zero, dict):
        take("parallel.zero_stage", zero.get("stage"), "zero_optimization.stage", _whole)
        for part in ("offload_optimizer", "offload_param"):
            device = (zero.get(part) or {}).get("device") if isinstance(zero.get(part), dict) else None
            if device not in (None, "none", "auto"):
                _refuse_offload(f"{source}: zero_optimization.{part}.device={json.dumps(device)}")
    enabled = {name: data[name].get("enabled") for name in ("bf16", "fp16") if isinstance(data.get(name), dict)}
    for name, on in enabled.items():
        if on is True:
            take("train.precision", name, f"{name}.enabled", lambda v, _s: v)
    if enabled and all(on is False for on in enabled.values()) and len(enabled) == 2:
        out.append(Setting("train.precision", "fp32", f"{source}: bf16.enabled=false and fp16.enabled=false"))
    take("train.grad_clip", data.get("gradient_clipping"), "gradient_clipping", _number)
    take("layout.grad_accum", data.get("gradient_accumulation_steps"), "gradient_accumulation_steps", _whole)
    take("layout.global_batch_size", data.get("train_batch_size"), "train_batch_size", _whole)
    take("layout.micro_batch_size", data.get("train_micro_batch_size_per_gpu"), "train_micro_batch_size_per_gpu",
         _whole)
    return out


def apply_settings(config_path: Optional[str], overrides: Sequence[str], settings: Sequence[Setting],
                   world_size: int) -> RunConfig:
    """The run config: the recipe, with accelerate's settings where the recipe is silent; refuses contradictions."""
    cfg = load_config(config_path, overrides)
    if not settings:
        return cfg
    chosen: Dict[str, Setting] = {}
    for setting in settings:
        earlier = chosen.get(setting.key)
        if earlier is not None and not _same(setting.key, earlier.value, setting.value):
            raise UserError(f"accelerate's settings disagree: {earlier.source}, but {setting.source}; keep one of them")
        chosen.setdefault(setting.key, setting)

    extra: List[Setting] = []
    for key, setting in chosen.items():
        if key in DERIVED:
            continue
        section, field = key.split(".")
        part = getattr(cfg, section)
        mine = getattr(part, field)
        # "auto" precision in a recipe means "gptdist chooses", which accelerate's explicit choice may settle.
        explicit = (field in part.model_fields_set and mine is not None
                    and not (key == "train.precision" and mine == "auto"))
        if explicit and not _same(key, mine, setting.value):
            raise UserError(f"{setting.source} contradicts {key}={mine} of the recipe: make them agree "
                            f"({key}={setting.value} on the gptdist command line, or change accelerate's)")
        if not explicit:
            extra.append(setting)
    if extra:
        try:
            cfg = load_config(config_path, [*overrides, *(f"{s.key}={json.dumps(s.value)}" for s in extra)])
        except UserError as err:
            came = "; ".join(f"{s.key}={s.value} came from {s.source}" for s in extra)
            raise UserError(f"{err}; {came}") from None

    layout = Layout.resolve(cfg, world_size)
    for key, label in DERIVED.items():
        if key in chosen and chosen[key].value != getattr(layout, key.split(".")[1]):
            raise UserError(_derived_mismatch(chosen[key], label, layout))
    return cfg


def _derived_mismatch(setting: Setting, label: str, layout) -> str:
    derived = (f"{layout.grad_accum} = train.global_batch_size {layout.global_batch_size} / (train.micro_batch_size "
               f"{layout.micro_batch_size} x dp {layout.dp})")
    if setting.key == "layout.grad_accum":
        wanted = setting.value * layout.micro_batch_size * layout.dp
        return (f"{setting.source}, but gptdist derives the {label} itself: {derived}; set "
                f"train.global_batch_size={wanted} for {setting.value} steps, and leave accelerate's at "
                f"{layout.grad_accum} or unset (\"auto\" in a DeepSpeed file)")
    if setting.key == "layout.global_batch_size":
        return (f"{setting.source}, but the recipe's global batch size is {layout.global_batch_size}; set "
                f"train.global_batch_size={setting.value}, or \"auto\" in the DeepSpeed file")
    return (f"{setting.source}, but the recipe's micro-batch size is {layout.micro_batch_size}; set "
            f"train.micro_batch_size={setting.value}, or \"auto\" in the DeepSpeed file")


def _same(key: str, a: Any, b: Any) -> bool:
    if key == "train.deepspeed_config":
        return Path(str(a)).expanduser().resolve() == Path(str(b)).expanduser().resolve()
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    return a == b


def _whole(value: Any, source: str) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if isinstance(value, bool) or not number.is_integer():
        raise UserError(f"{source}: not a whole number")
    return int(number)


def _number(value: Any, source: str) -> float:
    try:
        if isinstance(value, bool):
            raise ValueError
        return float(value)
    except (TypeError, ValueError):
        raise UserError(f"{source}: not a number") from None


def _refuse_offload(source: str) -> None:
    raise UserError(f"{source}: gptdist does not offload optimizer states or parameters; set it to none (more "
                    "ranks with parallel.zero_stage=3, or tensor/pipeline parallelism, fit a larger model)")
