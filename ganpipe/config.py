"""Typed configuration: every section and key, its default, its checks, and a stable hash. Reading
YAML files and `--set` overrides into it is ganpipe.config_files.

Every key has one home here. Code receives the section it needs (`cfg.train`, `cfg.data`), never a
loose dictionary.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    field_validator,
    model_validator,
)

from ganpipe import network, strict_yaml
from ganpipe.config_values import AdaTransform, Beta, Fraction, LossName, Name, Seed
from ganpipe.metric_settings import MetricSettings


class _Section(BaseModel):
    # No inf or nan: every float key is a rate, weight, fraction or threshold.
    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)


def batch_split_problem(batch_size: int, processes: int, grad_accum: int, pack: int) -> str | None:
    """Why train.batch_size cannot be split evenly into processes x accumulation steps x packs
    (None when it can). Checked when the config loads, and again by each rank against the
    process count accelerate actually started."""
    per_process = batch_size // processes
    if batch_size % processes or per_process % grad_accum or (per_process // grad_accum) % pack:
        return (f"train.batch_size {batch_size} must divide into {processes} processes x {grad_accum} "
                f"accumulation steps x model.pack {pack}")
    return None


DEFAULT_HOLDOUT_FRACTION = 0.1  # data.holdout_fraction of srgan runs


class DataConfig(_Section):
    source: str = Field(description="hub id, local path (save_to_disk dir, parquet file/glob, image folder), "
                        "s3://bucket/prefix, or builtin:digits")
    kind: Literal["image", "vector"] = "image"
    columns: list[str] | None = Field(None, description="numeric columns for kind: vector")
    image_column: str | None = None
    label_column: str | None = None
    classes: list[str] | None = Field(None, description="declared class names; other labels are bad records")
    resolution: int | None = Field(32, ge=4, le=1024, description="images are resized to this square size; "
                                   "null: each image's own size (square images of one size)")
    channels: Literal[1, 3] | None = Field(None, description="1 or 3; default: 1 when the images are grayscale")
    resize: Literal["center_crop", "pad", "stretch", "native"] = Field(
        "center_crop", description="how images become data.resolution px squares; native: kept at their own size "
                                   "(model.family srgan, whose training crops them; set for it by default)")
    holdout_fraction: float | None = Field(
        None, gt=0, lt=1, description="model.family srgan: this fraction of the images (chosen by a fixed seeded "
                                      "permutation) is never trained on and is what PSNR/SSIM measure; default "
                                      f"{DEFAULT_HOLDOUT_FRACTION}")
    degradation: Literal["bicubic", "crappify"] = Field(
        "bicubic", description="model.family srgan: how the low-resolution input is made from each high-resolution "
                               "crop: PIL's bicubic downscale of the uint8 image, or crappify (Gaussian blur before, "
                               "noise and JPEG after it, each of random strength, seeded)")
    lr_column: str | None = Field(
        None, description="model.family srgan, paired data (Div2k-style): the column of low-resolution images; each "
                          "must be its HR image's size divided by model.scale (rounded down), else a bad record; "
                          "training crops aligned pairs instead of degrading (set with data.hr_column)")
    hr_column: str | None = Field(None, description="paired data: the column of high-resolution images (set with "
                                                    "data.lr_column)")
    on_bad_record: Literal["error", "skip"] = "error"
    split: str = "train"
    config_name: str | None = Field(None, description="hub dataset configuration")
    revision: str | None = Field(None, description="hub dataset revision (branch, tag or commit)")
    max_records: int | None = Field(None, ge=1)
    max_per_class: int | None = Field(
        None, ge=1, description="labelled data: keep the first this many rows of each class, in source order "
                                "(a class-balanced subset: simulates a small labelled set)")
    shard_size: int = Field(10_000, ge=1, description="records per prepared shard")
    cache: str | None = Field(None, description="where prepared data lives; default $GANPIPE_HOME/prepared")
    # Paired data: model.scale, which ingest checks every pair against. Set by Config from the
    # model section (the data section alone does not know it); not a key of its own.
    _pair_scale: int | None = PrivateAttr(None)

    @property
    def effective_holdout_fraction(self) -> float:
        """The share of images srgan holds out: the key, else its default. Config sets the default
        for srgan when it loads; a DataConfig built on its own (tests, older callers) may not have."""
        return self.holdout_fraction if self.holdout_fraction is not None else DEFAULT_HOLDOUT_FRACTION

    @model_validator(mode="after")
    def _vector_needs_columns(self) -> DataConfig:
        if self.kind == "vector" and not self.columns:
            raise ValueError("data.columns is required when data.kind is 'vector'")
        return self

    @model_validator(mode="after")
    def _pair_columns_together(self) -> DataConfig:
        for key, other in (("lr_column", "hr_column"), ("hr_column", "lr_column")):
            if getattr(self, key) is not None and getattr(self, other) is None:
                raise ValueError(f"data.{other}: paired data names both columns (data.{key} is set)")
        if self.lr_column is not None and self.lr_column == self.hr_column:
            raise ValueError(f"data.lr_column: {self.lr_column!r} is data.hr_column too; a pair is two columns")
        if self.lr_column is not None and self.image_column is not None:
            raise ValueError("data.image_column: paired data names its columns with data.hr_column and data.lr_column")
        return self

    @property
    def paired(self) -> bool:
        """An LR and an HR column (data.lr_column): the LR images are given, not made."""
        return self.lr_column is not None

    @property
    def pair_scale(self) -> int | None:
        return self._pair_scale


class ModelConfig(_Section):
    family: Literal["mlp", "dcgan", "resnet", "r3gan", "srgan"] = Field(
        "dcgan", description="mlp (vectors or flattened images) | dcgan (8-1024 px) | resnet (SNGAN/BigGAN-style "
                             "residual networks, 32-256 px) | r3gan (R3GAN's normalisation-free residual networks, "
                             "16-256 px); resnet and r3gan need image data | srgan (super-resolution: an SRResNet "
                             "generator from low- to high-resolution images, a VGG-style discriminator)")
    conditional: bool = False
    latent_dim: int = Field(100, ge=1)
    g_width: int = Field(64, ge=1, description="generator base channels (dcgan, resnet, r3gan: the layers at the "
                                               "image's size; smaller maps get up to 16x) / MLP hidden units")
    d_width: int = Field(64, ge=1, description="discriminator base channels (as g_width) / MLP hidden units")
    mlp_layers: int = Field(3, ge=1, description="hidden layers of each MLP network")
    g_conditioning: Literal["auto", "embedding", "cbn"] = Field(
        "auto", description="how labels enter G. auto: cbn for resnet, embedding otherwise; resnet takes cbn "
                            "only, r3gan embedding only (the other is refused)")
    d_conditioning: Literal["projection", "concat"] = Field(
        "projection", description="how labels enter D; resnet and r3gan take projection only")
    spectral_norm: bool = Field(
        False, description="spectral norm on D's layers (mlp, dcgan). resnet: always on, this key is ignored; "
                           "r3gan: refused (it has no normalisation)")
    d_norm: Literal["auto", "batch", "none"] = Field(
        "auto", description="auto: batch norm, except none with spectral norm or a gradient penalty; resnet and "
                            "r3gan have no batch norm in D (batch is refused)")
    pack: int = Field(1, ge=1, description="PacGAN: the discriminator judges this many samples jointly")
    attention_resolution: int = Field(
        0, ge=0, description="resnet: SAGAN self-attention in G and D at this feature-map size, one of G's "
                             "resolutions from 8 to data.resolution (0: off; r3gan refuses it)")
    r3gan_expansion: int = Field(2, ge=1, description="r3gan: inverted bottleneck width = stage width x this")
    r3gan_group_size: int = Field(
        16, ge=1, description="r3gan: channels per group of the grouped 3x3 convolution; must divide every "
                              "expanded width (or exceed it: one group)")
    r3gan_blocks: int = Field(2, ge=1, description="r3gan: residual blocks per resolution, in G and in D")
    scale: Literal[2, 4, 8] = Field(4, description="srgan: the upscaling factor, 2, 4 or 8")
    sr_blocks: int = Field(16, ge=1, description="srgan: residual blocks of the generator")
    sr_batch_norm: bool = Field(False, description="srgan: batch norm in the generator's residual blocks (off, as "
                                                  "in ESRGAN: no artefacts at sizes other than the crop's)")
    sr_input_skip: Literal["none", "bicubic"] = Field(
        "none", description="srgan: bicubic: the generator's output is a residual added to the bicubic upscale of its "
                            "input (VDSR's global residual learning; its last layer starts at zero, so training starts "
                            "from bicubic and reaches it in no steps instead of thousands); none: SRResNet's form")

    def g_conditioning_used(self) -> str:
        """g_conditioning as the family builds it: `auto` is cbn for resnet, embedding otherwise."""
        if self.g_conditioning != "auto":
            return self.g_conditioning
        return "cbn" if self.family == "resnet" else "embedding"


class TrainConfig(_Section):
    steps: int = Field(2000, ge=1, description="training iterations (each: k D updates + 1 G update)")
    batch_size: int = Field(64, ge=1, description="global batch per update, split across processes")
    loss: LossName = Field(
        "non_saturating", description="GAN objective (ganpipe/losses.py). hinge suits model.family resnet; "
        "relativistic (RpGAN) with r1_gamma and r2_gamma is the R3GAN recipe for model.family r3gan")
    g_lr: float = Field(2e-4, gt=0)
    d_lr: float = Field(2e-4, gt=0)
    betas: tuple[Beta, Beta] = Field((0.5, 0.999), description="Adam's two betas, each in [0, 1)")
    lr_decay: Literal["none", "linear", "cosine"] = Field(
        "none", description="decay both rates to 0 by the last step, linearly or along a half cosine")
    lr_decay_start: float = Field(0.5, ge=0, lt=1, description="fraction of train.steps where the decay starts")
    d_steps: int = Field(1, ge=1, description="k: discriminator updates per generator update")
    schedule: Literal["fixed", "adaptive"] = "fixed"
    adaptive_d_threshold: float = Field(0.3, description="adaptive: train D until its loss is below this")
    adaptive_g_threshold: float = Field(1.0, description="adaptive: then G until its loss is below this")
    gp_weight: float = Field(10.0, ge=0)
    r1_gamma: float = Field(0.0, ge=0, description="R1 penalty weight on real data (0: off)")
    augment: Literal["none", "diffaug", "ada"] = Field(
        "none", description="differentiable augmentation of every image the discriminator sees (real and generated, "
                            "both updates; image data only): diffaug = DiffAugment (colour, translation, cutout), "
                            "ada = adaptive (each transform with probability p, adjusted toward train.ada_target)")
    ada_target: float = Field(0.6, ge=0, lt=1, description="ada: the target of r_t = E[sign(D(real))]; above it "
                              "(D overfits) p rises, below it p falls")
    ada_interval: int = Field(4, ge=1, description="ada: adjust p every this many discriminator updates")
    ada_transforms: list[AdaTransform] = Field(
        default_factory=lambda: list(get_args(AdaTransform)), min_length=1, description="ada: the transforms p "
        "applies (default: all); leave out those that change what an image shows (digits: xflip, rotate90)")
    ada_kimg: float = Field(100.0, gt=0, description="ada: thousands of real images over which p can move by 1; "
                            "smaller reacts faster (a few hundred images or short runs: 1-10)")
    r2_gamma: float = Field(0.0, ge=0, description="R2 penalty weight: R1's penalty on generated samples (0: off)")
    reg_every: int = Field(1, ge=1, description="lazy regularisation: R1/R2 on every N-th D update, scaled by N")
    gamma_decay: Literal["none", "linear", "cosine"] = Field(
        "none", description="anneal r1_gamma and r2_gamma to gamma_final_ratio times their value over anneal_steps")
    gamma_final_ratio: float = Field(0.1, ge=0, description="gamma_decay: the final fraction of each gamma")
    beta2_final: float | None = Field(None, ge=0, lt=1, description="ramp Adam's beta2 from betas[1] to this "
                                      "over anneal_steps (half cosine; R3GAN: 0.9 -> 0.99); null: constant")
    ada_target_final: float | None = Field(None, gt=0, lt=1, description="ADA: anneal the target to this "
                                           "over anneal_steps (half cosine); null: constant")
    anneal_steps: int | None = Field(None, ge=1, description="steps over which gamma_decay, beta2_final and "
                                     "ada_target_final move (then hold); null: train.steps")
    condition_ramp: tuple[Fraction, Fraction] | None = Field(
        None, description="conditional models: the labels' strength in G and D is 0 (unconditional) until this "
        "fraction of train.steps, then rises linearly to 1 at that one (against class-conditional collapse on "
        "little data, Shahbazi et al. 2022); null: full strength throughout")
    mode_seeking: float = Field(0.0, ge=0, description="weight of MSGAN's mode-seeking term in G's loss (pairs of "
                                "one class from two latents pushed apart; against collapse within a class); 0: off")
    ema_decay: float = Field(0.999, ge=0, lt=1)
    pretrain_steps: int = Field(0, ge=0, description="srgan: generator updates on the content loss alone (the "
                                "PSNR model) before any adversarial step")
    critic_pretrain_steps: int = Field(0, ge=0, description="srgan: then discriminator updates on real crops vs "
                                       "the pretrained generator's outputs; then train.steps adversarial steps")
    pixel_loss: Literal["l1", "mse"] = Field("l1", description="srgan: the pixel part of the content loss")
    vgg_weights: str | None = Field(None, description="srgan: a VGG19 weights file (torchvision's layout, .pth "
                                    "or .safetensors) for the feature loss; never downloaded. None: pixel loss only")
    feature_weight: float = Field(1.0, ge=0, description="srgan: weight of the VGG19 feature loss (conv5_4, before "
                                  "its ReLU, as ESRGAN)")
    adversarial_weight: float = Field(5e-3, ge=0, description="srgan: weight of the adversarial term in the "
                                      "generator's loss during the train.steps adversarial steps")
    sr_gan_loss: Literal["standard", "relativistic_average"] = Field(
        "relativistic_average", description="srgan: the adversarial objective (ESRGAN: relativistic average)")
    grad_accum: int = Field(1, ge=1)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    num_processes: int = Field(1, ge=1)
    num_machines: int = Field(1, ge=1)
    accelerate_config: str | None = Field(None, description="accelerate config file (multi-node, GPUs)")
    cpu: bool = Field(False, description="force CPU even when a GPU is present")
    checkpoint_every: int = Field(500, ge=1)
    keep_checkpoints: int = Field(3, ge=1)
    best_metric: Literal["fd_domain", "none"] = Field(
        "fd_domain", description="scores each checkpoint's EMA generator; the lowest is kept as `best`")
    best_num_samples: int = Field(1000, ge=2, description="samples per side for the checkpoint score")
    final_generator: Literal["last", "best"] = Field(
        "last", description="the run's generator (evaluated, registered, exported): the last EMA, or the "
                            "best-scoring checkpoint's EMA")
    log_every: int = Field(50, ge=1)
    sample_every: int = Field(500, ge=1)
    compile: bool = False
    channels_last: bool = False
    prefetch: int = Field(2, ge=0, le=64, description="real batches a background thread gathers ahead of the "
                          "step (0: in the step); the same batches in the same order either way")
    data_on_device_fraction: float = Field(0.25, ge=0, le=1, description="CUDA: keep the prepared data on the "
                                           "device when it fits in this fraction of its memory (0: never)")
    run_name: Name | None = Field(None, description="the run folder's name under $GANPIPE_HOME/runs (a name, "
                                  "not a path); default: register.name and the run's identity")

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value: Any) -> Any:
        """YAML 1.1 reads a bare `no` as false: `mixed_precision: no` means "no"."""
        return "no" if value is False else value

    @model_validator(mode="after")
    def _schedules_fit_the_run(self) -> TrainConfig:
        if self.anneal_steps is not None and self.anneal_steps > self.steps:
            raise ValueError(f"train.anneal_steps {self.anneal_steps} does not fit train.steps {self.steps}: "
                             "the schedules would never reach their final values")
        return self

    @model_validator(mode="after")
    def _ada_transforms_and_ramp(self) -> TrainConfig:
        if len(set(self.ada_transforms)) < len(self.ada_transforms):
            raise ValueError(f"train.ada_transforms {self.ada_transforms}: a transform is listed twice")
        # Not "the key is set": a saved run's config lists every key, defaults included.
        if self.augment != "ada" and tuple(self.ada_transforms) != get_args(AdaTransform):
            raise ValueError(f"train.ada_transforms: chooses ADA's transforms; train.augment is {self.augment} "
                             "(set ada, or remove the key)")
        if self.condition_ramp is not None and self.condition_ramp[0] >= self.condition_ramp[1]:
            raise ValueError(f"train.condition_ramp {list(self.condition_ramp)}: the start must come before the "
                             "end (fractions of train.steps)")
        return self

    @model_validator(mode="after")
    def _best_needs_scores(self) -> TrainConfig:
        if self.final_generator == "best" and self.best_metric == "none":
            raise ValueError("train.final_generator 'best' needs checkpoint scores: set train.best_metric")
        return self


class EvalConfig(_Section, MetricSettings):
    """Also the metrics' own keys (uplift_*, prdc_k): ganpipe.metric_settings."""

    metrics: list[str] = Field(default_factory=lambda: ["fd_domain"])
    num_samples: int = Field(2048, ge=2)
    inception_weights: str | None = None
    bootstrap: int = Field(20, ge=0, description="bootstrap resamples for uncertainty (0: none)")
    num_processes: int = Field(1, ge=1, description="`ganpipe evaluate` and the evaluation flow: extract "
                               "features in this many processes (devices) through accelerate")
    resolution: int | None = Field(None, ge=4, le=1024, description="`ganpipe evaluate` with datasets on both "
                                   "sides: the resolution both are prepared at; null: the real data's own "
                                   "(a MODEL side sets its own)")
    sr_y_channel: bool = Field(True, description="srgan: psnr and ssim on the Y channel of RGB images (MATLAB's "
                               "and BasicSR's convention for published numbers); false: on RGB")


class RegisterConfig(_Section):
    name: Name = "ganpipe-generator"
    primary_metric: str = "fd_domain"
    margin: float = Field(0.0, ge=0, description="also required improvement, beyond the uncertainty")


class ExportConfig(_Section):
    num_images: int = Field(0, ge=0, description="0: the pipeline exports nothing")
    input: str | None = Field(None, description="super-resolution models: the dataset to super-resolve (any "
                              "data.source); the pipeline's default: the run's held-out images")
    image_column: str | None = Field(None, description="export.input's image column; default: its first image column")
    out: str | None = Field(None, description="local path or s3:// URI; flows default to "
                            "$GANPIPE_HOME/exports/<register.name>/v<version>")
    format: Literal["parquet", "imagefolder"] = "parquet"
    shard_size: int = Field(10_000, ge=1)
    class_balance: bool = Field(False, description="equal rows per class (conditional models)")
    class_counts: dict[str, int] | None = Field(
        None, description="explicit rows per class (class name -> rows), adding up to num_images")
    seed: Seed = 0
    num_processes: int = Field(1, ge=1, description="generating processes, started with accelerate launch")
    drop_lowest_d: float = Field(0.0, ge=0, lt=1, description="quality gate: drop about this fraction of rows, "
                                 "those the run's discriminator scores lowest (0: off)")
    memorisation_check: Literal["off", "report", "drop"] = Field(
        "off", description="quality gate: find rows that nearly copy a training example; list them, or drop them too")
    near_copy_ratio: float = Field(0.25, gt=0, description="memorisation check: near copy when the distance to the "
                                   "nearest training example is below this times the median nearest-neighbour "
                                   "distance within the training data")

    @field_validator("class_counts", mode="before")
    @classmethod
    def _class_names_as_text(cls, value: Any) -> Any:
        """YAML reads `{3: 100}` with integer keys: class names are text."""
        return {str(k): v for k, v in value.items()} if isinstance(value, dict) else value


class StorageConfig(_Section):
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint; default AWS_ENDPOINT_URL")
    # None defers to the environment, so commands without a config (register, generate) and child
    # processes follow the same budget (ganpipe.network).
    timeout_s: float | None = Field(None, gt=0, le=network.MAX_TIMEOUT_S, description="longest one network request "
                                    "(S3, MLflow, Prefect, hub) may go unanswered, retries included; default "
                                    f"${network.TIMEOUT_VARIABLE}, else {network.DEFAULT_TIMEOUT_S:g}")
    retries: int | None = Field(None, ge=0, le=network.MAX_RETRIES, description="retries of a failed network "
                                f"request; default ${network.RETRIES_VARIABLE}, else {network.DEFAULT_RETRIES}")


class DeployConfig(_Section):
    cron: str | None = None
    timezone: str = "UTC"
    work_pool: str = "ganpipe-gpu"


class Config(_Section):
    seed: Seed = 0
    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    # YAML key `register` (the contract's); `registry` in code, since pydantic owns `register`.
    registry: RegisterConfig = Field(default_factory=RegisterConfig, alias="register")
    export: ExportConfig = Field(default_factory=ExportConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    deploy: DeployConfig = Field(default_factory=DeployConfig)

    @model_validator(mode="after")
    def _super_resolution_data(self) -> Config:
        """srgan keeps images at their own size (crops are drawn in training) and holds part of
        them out; the other families square them and hold nothing out."""
        d, sr = self.data, self.model.family == "srgan"
        if sr and d.kind != "image":
            raise ValueError(f"data.kind: model.family srgan super-resolves images, not {d.kind}s")
        if sr and "resize" not in d.model_fields_set:
            d.resize = "native"
        if sr and d.resize != "native":
            raise ValueError(f"data.resize: model.family srgan keeps images at their own size (native), not {d.resize}")
        if not sr and d.resize == "native":
            raise ValueError("data.resize: native (images at their own size) is for model.family srgan")
        if sr and d.holdout_fraction is None:
            d.holdout_fraction = DEFAULT_HOLDOUT_FRACTION
        if not sr and d.holdout_fraction is not None:
            raise ValueError("data.holdout_fraction: only model.family srgan holds data out")
        if d.paired and not sr:
            raise ValueError("data.lr_column: paired (LR, HR) data is for model.family srgan")
        if d.paired and d.degradation != "bicubic":
            raise ValueError(f"data.degradation: paired data brings its LR images (data.lr_column); {d.degradation} "
                             "does not apply")
        d._pair_scale = self.model.scale if d.paired else None
        return self

    @model_validator(mode="after")
    def _batch_splits(self) -> Config:
        problem = batch_split_problem(self.train.batch_size, self.train.num_processes, self.train.grad_accum,
                                      self.model.pack)
        if problem:
            raise ValueError(problem)
        return self

    def hash(self) -> str:
        """Stable content hash of the effective config (key order and formatting do not matter)."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)

    def to_yaml(self) -> str:
        return strict_yaml.dump(self.to_dict())


class CommandConfig(_Section):
    """The sections of a config that `ganpipe export` and `ganpipe evaluate` read, with Config's
    fields (and so its defaults): a pipeline config serves as is, and no file at all is valid."""

    seed: int = Config.model_fields["seed"]
    eval: EvalConfig = Config.model_fields["eval"]
    export: ExportConfig = Config.model_fields["export"]
    storage: StorageConfig = Config.model_fields["storage"]
