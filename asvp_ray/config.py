"""Typed configuration: the one module that reads YAML and command-line overrides.

Everything below receives validated pydantic objects. An unknown key is an error that names the
nearest valid key; a value of the wrong type names the key, the value and what was expected.
"""
from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence, Type, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError, field_validator, model_validator

from asvp_ray.core.errors import ConfigError
from asvp_ray.train.config import TrainConfig


def _registered(registry, name: str) -> str:
    """``name`` when ``registry`` knows it; else ConfigError listing the valid names (and the closest)."""
    registry.get(name)
    return name


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SourceConfig(_Strict):
    """Where images come from (see ``asvp_ray.data.sources``)."""

    kind: str = Field("fashion_mnist", description="a registered source: asvp_ray.data.sources.SOURCES")
    root: Optional[str] = Field(None, description="fashion_mnist or image_folder folder")
    path: Optional[str] = Field(None, description="manifest file (.parquet or .csv)")
    split: Literal["train", "test"] = "train"
    limit: Optional[PositiveInt] = Field(None, description="fashion_mnist: keep the first `limit` images")
    shards: Optional[Union[str, List[str]]] = Field(
        None, description="webdataset: the tar shards: a folder, a glob, a brace pattern "
                          "(s3://bucket/shard-{000000..000999}.tar) or a list; local or s3:// / gs://")
    id: Optional[str] = Field(
        None, description="webdataset: where the id is (__key__ (default), json.FIELD or a member such as id); "
                          "parquet_images: the id column (default id)")
    hash_ids: bool = Field(False, description="webdataset / parquet_images: number images by a stable 63-bit hash "
                                              "of the id value, for ids that are not integers")
    image: Optional[str] = Field(
        None, description="webdataset: the image member's extensions, first present wins (default: jpg;jpeg;png;"
                          "webp;...); parquet_images: the image column (binary or {bytes, path}; default image)")
    label: Optional[str] = Field(
        None, description="webdataset: the label member (cls, txt or json.FIELD; default cls where present); "
                          "parquet_images: the label column (default label where present)")

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, v):
        from asvp_ray.data.sources import SOURCES

        return _registered(SOURCES, v)

    @model_validator(mode="after")
    def _keys_of_kind(self):
        used = {"webdataset": {"shards", "id", "hash_ids", "image", "label"},
                "parquet_images": {"path", "id", "hash_ids", "image", "label"}}
        for key in ("shards", "id", "image", "label", "hash_ids"):
            if getattr(self, key) not in (None, False) and key not in used.get(self.kind, set()):
                kinds = [k for k, keys in used.items() if key in keys]
                raise ValueError(f"{key} is a setting of data source kind {' and '.join(kinds)}, not of {self.kind}; "
                                 f"remove it or set kind: {kinds[0]}")
        return self


class DataConfig(_Strict):
    pool: SourceConfig = Field(default_factory=SourceConfig)
    test: Optional[SourceConfig] = Field(default_factory=lambda: SourceConfig(split="test"))
    classes: Optional[List[str]] = Field(None, description="class names; index = label")
    skip_unreadable: bool = Field(False, description="skip unreadable images (ids listed in meta.json)")


class BackboneConfig(_Strict):
    name: str = "tf_efficientnet_lite0"
    weights: str = Field("auto", description="auto | hub | lite0_package | none | path to a checkpoint")
    image_size: Optional[PositiveInt] = None
    crop_pct: Optional[float] = Field(None, gt=0, le=1)
    init_seed: int = 0


class ExtractConfig(_Strict):
    """Feature extraction: the Ray Data actor pool, its resources, device and precision.

    The pool grows between ``min_actors`` and ``max_actors`` while batches wait (Ray Data's
    actor-pool autoscaling); actors that do not fit the cluster now stay pending, which is the
    demand an autoscaling cluster adds nodes for.
    """

    batch_size: PositiveInt = 256
    num_actors: Optional[PositiveInt] = Field(
        None, description="a fixed pool size, the same as min_actors = max_actors = n (kept for older configs; "
                          "prefer min_actors / max_actors); cannot be combined with them")
    min_actors: Optional[PositiveInt] = Field(
        None, description="actors the pool starts with and keeps; unset: 1")
    max_actors: Optional[PositiveInt] = Field(
        None, description="the most actors the pool grows to while batches wait; unset: what the cluster holds "
                          "when the extraction starts (GPU actors: its GPUs / num_gpus_per_actor; CPU actors: its "
                          "CPUs minus one for the read tasks / num_cpus_per_actor). An autoscaler's node limit is "
                          "not visible to Ray, so on an autoscaling cluster set it to the number of actors its "
                          "largest size holds (e.g. the GPU workers' max_workers x GPUs per node)")
    num_cpus_per_actor: PositiveFloat = 1.0
    num_gpus_per_actor: float = Field(1.0, gt=0, le=8)
    resources_per_actor: Dict[str, PositiveFloat] = Field(
        default_factory=dict,
        description="custom Ray resources each actor also reserves, e.g. {extract_node: 1} to pin the actors to a "
                    "node type that declares that resource (CPU and GPU are set by num_cpus_per_actor / "
                    "num_gpus_per_actor)")
    resource_timeout_s: PositiveFloat = Field(
        600.0, description="how long the extraction waits for the GPUs or resources_per_actor it asks for to appear "
                           "in the cluster (an autoscaler adding a node) before it fails naming them; "
                           "$ASVP_RESOURCE_TIMEOUT_S overrides it")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: GPU actors when the cluster has a GPU now, else CPU actors (logged); cuda: GPU "
                            "actors, waiting up to resource_timeout_s for a GPU node; cpu: CPU actors")
    torch_threads: Optional[PositiveInt] = Field(None, description="None: the node's CPUs split among actors")
    amp: Literal["auto", "off", "bf16", "fp16"] = Field(
        "auto", description="mixed precision of GPU actors: auto (bf16 on compute capability >= 8.0, else fp16), "
                            "off (float32), bf16 (refused on older cards), fp16; CPU actors always use float32. "
                            "Recorded in meta.json and part of the feature-cache key")
    progress: bool = True

    @field_validator("amp", mode="before")
    @classmethod
    def _amp_bool(cls, v):
        from asvp_ray.runtime.device import normalize_amp

        return normalize_amp(v, "extract.amp") if isinstance(v, bool) else v

    @field_validator("resources_per_actor")
    @classmethod
    def _custom_only(cls, v):
        taken = {"cpu": "num_cpus_per_actor", "gpu": "num_gpus_per_actor"}
        for name in v:
            if name.lower() in taken:
                raise ValueError(f"extract.resources_per_actor names {name!r}; set extract.{taken[name.lower()]} "
                                 "instead (resources_per_actor is for custom resources, e.g. {extract_node: 1})")
            if name.lower() in ("memory", "object_store_memory") or not name.strip():
                raise ValueError(f"extract.resources_per_actor names {name!r}, which is not a custom resource; use "
                                 "a resource name a node type declares, e.g. {extract_node: 1}")
        return v

    @model_validator(mode="after")
    def _pool_size(self) -> "ExtractConfig":
        if self.num_actors is not None and (self.min_actors is not None or self.max_actors is not None):
            raise ValueError(f"extract.num_actors={self.num_actors} is a fixed pool size (min = max); set either it or "
                             "extract.min_actors / extract.max_actors, not both")
        if self.min_actors is not None and self.max_actors is not None and self.min_actors > self.max_actors:
            raise ValueError(f"extract.min_actors={self.min_actors} is more than extract.max_actors={self.max_actors}; "
                             f"set max_actors >= {self.min_actors}")
        return self


class ProxyConfig(_Strict):
    hidden: Optional[PositiveInt] = Field(None, description="None: the feature width, as in the reference")
    linear: bool = False
    epochs: PositiveInt = 50
    batch_size: PositiveInt = 2048
    lr: PositiveFloat = 0.1
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    normalize: Literal["none", "l2", "standardize"] = "none"
    device: Literal["auto", "cpu", "cuda"] = Field(
        "cpu", description="cpu, or auto: CUDA when the process that fits the proxy sees a GPU (a Tune trial "
                           "with --gpus-per-trial; the run's driver reserves none), logged; cuda is refused")

    @field_validator("device")
    @classmethod
    def _device_where_it_runs(cls, v):
        # The proxy is fitted in the run's driver, a Ray actor that reserves no GPU (asvp-ray run puts it on the
        # head node), so 'cuda' could only fail, and only after features were extracted.
        if v == "cuda":
            raise ValueError(
                "proxy.device: cuda cannot work: the proxy is fitted in the run's driver, which reserves no GPU "
                "(it runs on the head node); set proxy.device: auto (uses a GPU where the fitting process has "
                "one, e.g. a Tune trial started with --gpus-per-trial 1, and logs its choice) or cpu")
        return v


class BudgetConfig(_Strict):
    schedule: List[PositiveInt] = Field(default_factory=lambda: [100, 100, 100],
                                        description="labels bought per round; round 0 is random")

    @field_validator("schedule")
    @classmethod
    def _non_empty(cls, v):
        if not v:
            raise ValueError("budget.schedule needs at least one round, e.g. [100, 100]")
        return v


class RefreshConfig(_Strict):
    """When to refresh features (asvp): a policy from ``asvp_ray.alignment.REFRESH_POLICIES``."""

    policy: str = Field("score_drop", description="a registered policy: asvp_ray.alignment.REFRESH_POLICIES")
    at: List[PositiveInt] = Field(default_factory=list, description="at_labels: label counts that trigger a refresh")
    score: str = Field("logme", description="score_drop/probe: a registered alignment score (ALIGNMENT_SCORES)")
    threshold: float = Field(0.05, ge=0, description="score_drop: drop of the score since the last refresh")
    margin: float = Field(0.05, description="probe: gain of fine-tuned over current features needed")
    min_new_labels: int = Field(1, ge=0, description="score_drop: labels bought since the last refresh")
    max_refreshes: Optional[int] = Field(2, ge=0, description="cap on refreshes (compute budget); null = none")
    reference: Literal["first", "best", "min_labels"] = Field(
        "first", description="score_drop: compare with the current features' first score (after the last "
                             "refresh, else round 0), their best so far, or their first score measured with "
                             ">= reference_min_labels labels")
    reference_min_labels: int = Field(0, ge=0, description="score_drop with reference: min_labels")
    keep_versions: int = Field(0, ge=0, description="feature versions kept on disk besides v0 (0 = all)")

    @field_validator("at")
    @classmethod
    def _sorted(cls, v):
        return sorted(v)

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, v):
        from asvp_ray.alignment import REFRESH_POLICIES

        return _registered(REFRESH_POLICIES, v)

    @field_validator("score")
    @classmethod
    def _known_score(cls, v):
        from asvp_ray.alignment.ped import ALIGNMENT_SCORES

        return _registered(ALIGNMENT_SCORES, v)


class MonitorConfig(_Strict):
    """The alignment monitor: scores of the current features on the labelled set."""

    scores: List[str] = Field(default_factory=lambda: ["logme", "logme_ped"],
                              description="registered alignment scores (asvp_ray.alignment.ped.ALIGNMENT_SCORES)")
    max_rows: PositiveInt = Field(20000, description="labelled rows scored at most (seeded subsample)")
    reference_rows: PositiveInt = Field(20000, description="pool rows standardising PED (seeded subsample)")

    @field_validator("scores")
    @classmethod
    def _known_scores(cls, v):
        from asvp_ray.alignment.ped import ALIGNMENT_SCORES

        return [_registered(ALIGNMENT_SCORES, name) for name in v]


class FinalConfig(_Strict):
    """The final model trained on the last labelled set."""

    training_method: Literal["auto", "lpft", "ft", "linear_probe", "none"] = Field(
        "auto", description="auto: ft for svpp/standard; for asvp lpft while features were never refreshed, "
                            "ft after a refresh; none: skip")


class CostConfig(_Strict):
    """Unit prices of the cost ledger (US$). Defaults: a crowd-sourced image label ~ $0.05; an on-demand
    cloud vCPU-hour ~ $0.05; a data-centre GPU-hour ~ $2.50."""

    per_label: float = Field(0.05, ge=0)
    per_cpu_hour: float = Field(0.05, ge=0)
    per_gpu_hour: float = Field(2.50, ge=0)


class LabelConfig(_Strict):
    """Human labelling (oracle: human): how label files are read and how tasks link images."""

    agreement: Literal["error", "majority", "last"] = Field(
        "error", description="several annotations of one image that disagree: error (refuse the import and list "
                             "them), majority (the most frequent label; a tie is an error) or last (the most "
                             "recently updated annotation)")
    local_files_root: str = Field(
        "/", description="LOCAL_FILES_DOCUMENT_ROOT of the Label Studio server: task image links are "
                         "/data/local-files/?d=PATH relative to it")


class PoolShardsConfig(_Strict):
    """Where the pool's features live while rounds select: in the driver or in shard actors."""

    mode: Literal["auto", "driver", "shards"] = Field(
        "auto", description="driver: the driver loads the current feature version (fastest while it fits); "
                            "shards: shard actors load their rows from the feature store themselves and the driver "
                            "holds ids, labels and the labelled rows' features only; auto: shards when the pool "
                            "matrix (rows x dim x 4 bytes) is over driver_memory_fraction of the driver node's "
                            "memory and the cluster has or can add other nodes, else the driver")
    driver_memory_fraction: float = Field(
        0.1, gt=0, le=1, description="auto: the largest share of the driver node's memory (Ray's 'memory' "
                                     "resource of that node; this machine's memory before Ray starts) the pool "
                                     "matrix may take in the driver")
    min_rows: Optional[PositiveInt] = Field(
        None, description="deprecated (use driver_memory_fraction): when set, auto shards pools of at least this "
                          "many rows, whatever their width, as before")
    num_shards: Optional[PositiveInt] = Field(None, description="shard actors; None: one per alive node, at least 2")
    num_cpus: float = Field(1.0, ge=0, description="CPUs each shard actor reserves (it scores and selects with them)")


class Config(_Strict):
    """A whole asvp-ray run."""

    name: str = "asvp-ray"
    seed: int = 0
    method: str = Field("svpp", description="a registered method: asvp_ray.methods.METHODS")
    strategy: str = Field("margin", description="a registered strategy: asvp_ray.selection.STRATEGIES; with options "
                                                "write strategy: {name: coreset, metric: cosine}")
    strategy_options: Dict[str, Any] = Field(
        default_factory=dict, description="the strategy's options (its constructor's keyword arguments; "
                                          "`strategy: {name: ..., OPTION: VALUE}` fills them)")
    oracle: str = Field(
        "simulated", description="simulated: the pool's ground truth; human: asvp-ray select / label rounds "
                                 "(asvp_ray.data.oracle.ORACLES)")
    data: DataConfig = Field(default_factory=DataConfig)
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    extract: ExtractConfig = Field(default_factory=ExtractConfig)
    proxy: ProxyConfig = Field(default_factory=ProxyConfig)
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    refresh: RefreshConfig = Field(default_factory=RefreshConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)
    final: FinalConfig = Field(default_factory=FinalConfig)
    cost: CostConfig = Field(default_factory=CostConfig)
    label: LabelConfig = Field(default_factory=LabelConfig)
    pool_shards: PoolShardsConfig = Field(default_factory=PoolShardsConfig)
    driver_threads: Optional[PositiveInt] = Field(
        None, description="threads for the driver actor's own compute (proxy training, pool scoring, local "
                          "selection); None: every CPU of the node it runs on (its phases do not overlap the "
                          "extraction and training workers'). The actor still reserves no CPU.")
    feature_cache: Optional[str] = Field(
        None, description="a folder or object-store URI shared by runs (e.g. Tune trials): features v0 of the "
                          "same backbone and data are extracted once there and reused (hard-linked from a local "
                          "folder, copied from or to a bucket)")
    storage: Optional[str] = Field(
        None, description="where the feature store, the fine-tuned model files and Ray Train's checkpoints "
                          "live: null = DIR/features and DIR/checkpoints in the run directory; a local folder or "
                          "an object-store URI (s3://bucket/prefix, gs://bucket/prefix; pyarrow.fs options after "
                          "'?', e.g. ?endpoint_override=host:port&scheme=http; credentials given there are never "
                          "written out). Each run gets its own folder there, recorded in DIR/storage.json; "
                          "state.json, summary.json, labeled.parquet, the lock and run.log stay in the run directory")

    @field_validator("storage")
    @classmethod
    def _storage_form(cls, v):
        from asvp_ray.storage.locations import check_storage

        return check_storage(v)

    @field_validator("feature_cache")
    @classmethod
    def _feature_cache_form(cls, v):
        from asvp_ray.storage.locations import check_storage

        return check_storage(v, "config key 'feature_cache'")

    @model_validator(mode="before")
    @classmethod
    def _strategy_mapping(cls, data):
        """``strategy: {name: coreset, metric: cosine}`` -> ``strategy: coreset`` and its options."""
        if isinstance(data, dict) and isinstance(data.get("strategy"), dict):
            from asvp_ray.selection.options import split_strategy

            data = dict(data)
            name, options = split_strategy(data["strategy"])
            data["strategy"] = name
            data["strategy_options"] = {**(data.get("strategy_options") or {}), **options}
        return data

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, v):
        from asvp_ray.selection import STRATEGIES

        return _registered(STRATEGIES, v)

    @model_validator(mode="after")
    def _strategy_options_valid(self):
        from asvp_ray.selection.options import build_strategy

        try:
            build_strategy(self.strategy, self.strategy_options)
        except ConfigError as e:
            raise ConfigError(f"config key 'strategy' ({self.strategy}, options {self.strategy_options}): {e}") from None
        return self

    @field_validator("method")
    @classmethod
    def _known_method(cls, v):
        from asvp_ray.methods import METHODS

        return _registered(METHODS, v)

    @field_validator("oracle")
    @classmethod
    def _known_oracle(cls, v):
        from asvp_ray.data.oracle import ORACLES

        return _registered(ORACLES, v)


def model_of(annotation: Any) -> Optional[Type[BaseModel]]:
    """The pydantic model inside a field annotation (``Optional[X]``, ``X``), if any."""
    for a in getattr(annotation, "__args__", None) or (annotation,):
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
    return None


def _model_at(model: Type[BaseModel], loc: Sequence[Any]) -> Optional[Type[BaseModel]]:
    for part in loc:
        field = model.model_fields.get(str(part)) if isinstance(part, str) else None
        if field is None:
            return None
        model = model_of(field.annotation)
        if model is None:
            return None
    return model


def set_key(raw: Dict[str, Any], key: Union[str, Sequence[str]], value: Any) -> Dict[str, Any]:
    """A copy of ``raw`` with the dotted ``key`` (``"a.b"`` or ``["a", "b"]``) set to a copy of
    ``value``; sections are created as needed, ``raw`` is not changed."""
    parts = key.split(".") if isinstance(key, str) else list(key)
    out = dict(raw)
    node = out
    for k in parts[:-1]:
        child = node.get(k)
        node[k] = dict(child) if isinstance(child, dict) else {}
        node = node[k]
    node[parts[-1]] = copy.deepcopy(value)
    return out


def read_yaml(path: Union[str, Path], what: str = "config file", example: str = "examples/smoke.yaml") -> Any:
    """The YAML document in ``path`` ({} when empty).

    Raises:
        ConfigError: the file is missing ("``what`` ... does not exist", naming ``example``) or
            is not valid YAML.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {str(path)!r} does not exist; pass a YAML file such as {example}")
    try:
        return yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None


def _format_errors(err: ValidationError, origin: str) -> str:
    lines = []
    for e in err.errors():
        loc = [p for p in e["loc"]]
        key = ".".join(str(p) for p in loc)
        if e["type"] == "extra_forbidden":
            parent = _model_at(Config, loc[:-1])
            valid = sorted(parent.model_fields) if parent else []
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
            prefix = ".".join(str(p) for p in loc[:-1])
            hint = f" Did you mean '{prefix + '.' if prefix else ''}{close[0]}'?" if close else ""
            lines.append(f"unknown config key '{key}'.{hint} Valid keys here: {', '.join(valid)}")
        else:
            msg = e["msg"]
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, "):]
            if not loc:  # a check across keys (Config's model validators): its message names them
                lines.append(msg)
            else:
                lines.append(f"config key '{key}': {msg} (got {e.get('input')!r})")
    return f"{origin}: " + "; ".join(lines)


def parse_override(text: str) -> tuple:
    """``a.b=value`` -> (["a", "b"], parsed YAML value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value, e.g. --set budget.schedule=[50,50]")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({e})") from None
    return key.strip().split("."), value


def apply_overrides(raw: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    out = dict(raw)
    for text in overrides:
        keys, value = parse_override(text)
        out = set_key(out, keys, value)
    return out


def load_config(path: Optional[str] = None, overrides: Sequence[str] = (), raw: Optional[Dict[str, Any]] = None) -> Config:
    """Read, override and validate a config.

    Args:
        path: YAML file (optional when ``raw`` is given).
        overrides: ``key.sub=value`` strings (values parsed as YAML), applied in order.
        raw: a dict used instead of (or before) the file.

    Raises:
        ConfigError: missing file, YAML syntax error, unknown key (with a suggestion), bad value.
    """
    data: Dict[str, Any] = dict(raw or {})
    origin = "config"
    if path is not None:
        origin = str(Path(path))
        loaded = read_yaml(path)
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(loaded).__name__}")
        data.update(loaded)
    if overrides:
        data = apply_overrides(data, overrides)
        origin += " with --set " + " ".join(overrides)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, origin)) from None


def upgrade_legacy_config(raw: Dict[str, Any]) -> Dict[str, Any]:
    """A run directory's ``config.yaml`` written before ``amp`` became ``auto|off|bf16|fp16``
    (a boolean there marks such a file), in today's terms, so that resuming it with the same
    config file is not refused: ``amp: true|false`` -> ``auto|off``, and the then-fixed
    ``train.cpus_per_worker: 1.0`` / ``train.loader_workers: 0`` -> unset (today's defaults, which
    resolve to the same on CPU workers, where every such run ran)."""
    out = dict(raw)
    train = out.get("train")
    if not (isinstance(train, dict) and isinstance(train.get("amp"), bool)):
        return out
    train = dict(train)
    train["amp"] = "auto" if train["amp"] else "off"
    if train.get("cpus_per_worker") == 1.0:
        train["cpus_per_worker"] = None
    if train.get("loader_workers") == 0:
        train["loader_workers"] = None
    out["train"] = train
    ext = out.get("extract")
    if isinstance(ext, dict) and isinstance(ext.get("amp"), bool):
        out["extract"] = {**ext, "amp": "auto" if ext["amp"] else "off"}
    return out


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML that ``load_config`` reads back unchanged."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
