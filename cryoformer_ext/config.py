"""User-facing settings of one cryoFormer job, shared by the CLI, RELION and cryoSPARC adapters.

The names are what a RELION user types into the External job's label/value fields, so they are short
snake_case words; :meth:`JobConfig.from_strings` turns those strings into typed values with a clear
error for anything it cannot read.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


#: the one rule for particles without CTF parameters, in every entry point (STAR, .cs, live cryoSPARC)
NO_CTF_HINT = ("cryoFormer needs them to model the images; if these images really have no CTF (simulated, or "
               "already CTF-corrected), set the job parameter ctf = no")
NO_CTF_LOG = ("WARNING: ctf = no: training without CTF correction (right only for images without a CTF, "
              "e.g. simulated or already CTF-corrected)")


class JobConfigError(ValueError):
    """A job parameter has a value that cannot be used; the message names the parameter."""


class JobConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    epochs: int = Field(20, ge=1, description="passes over the particle set")
    zdim: int = Field(8, ge=0, description="latent dimensions (0 = homogeneous reconstruction)")
    train_box: int | None = Field(None, ge=16, description="Fourier-crop images to this box for training (even; default: 64 or the input box if smaller)")
    batch_size: int = Field(8, ge=1, description="images per training step")
    lr: float = Field(3e-4, gt=0, description="Adam learning rate (hash tables 10x)")
    lr_final: float | None = Field(
        None, gt=0, le=1, description="learning rates at the end of training as a fraction of their start (cosine "
        "decay over the epochs; 1 = constant); default: 0.1 when the run trains at least 10,000 images "
        "(particles x epochs), else 1. The decay steadies the latent in the later epochs (the states separate "
        "further, the first principal component follows a motion more closely); a run of a few hundred images "
        "is all early epochs, and decaying there left its maps unformed")
    poses: Literal["given", "refine", "predict"] = Field(
        "given", description="given = use the input poses; refine = orientation encoder starting from them; predict = orientation encoder only")
    ctf: bool = Field(True, description="particles carry CTF parameters; no = images without a CTF (simulated or already corrected): train without CTF correction")
    attention: Literal["point", "literal"] = Field("point", description="spatial attention form (literal: small boxes / ablations)")
    tokens: int = Field(64, ge=1, description="structure queries N")
    channels: int = Field(64, ge=4, description="token width C")
    enc_layers: int = Field(10, ge=1, description="hidden layers of the image encoders")
    enc_dim: int = Field(128, ge=8, description="width of the image encoders")
    hash_scale: float | None = Field(None, ge=1.0, description="hash-grid per-level scale (default: finest level = training box; 1.5 = paper/tcnn config)")
    render: Literal["rotated", "canonical"] = Field(
        "canonical", description="canonical = the field once per step on a jittered voxel grid, each image's map "
        "projected (about 2x faster); rotated = the field at each image's rotated grid (the paper's form)")
    cross_values: Literal["deformation", "queries"] = Field(
        "deformation", description="values of the decoder's cross-attention: deformation = from the image's "
        "deformation tokens F_D (z moves the tokens directly; learns the motion sooner at low SNR); queries = "
        "Attn(Q, F_D, Q), the paper's form")
    query_code: float = Field(
        2.0, ge=0, description="periods per box of a fixed position code added to the point attention's query, "
        "so that regions attend to different tokens from the start (the motion is learned sooner); 0 = the "
        "paper's query")
    deformation_norm: bool = Field(
        False, description="layer-normalise the latent's deformation tokens before the decoder's cross-attention "
        "(checkpoints made before this parameter: yes). With it the maps depend on the latent's direction only, "
        "and a motion lies on an arc whose first principal component follows it less well")
    encoder_box: int | None = Field(
        None, ge=8, description="the deformation encoder sees the image Fourier-cropped to this box (a low-pass; "
        "even); default: the training box")
    occupancy: bool = Field(True, description="render only occupied cells of a coarse grid estimated from the "
                            "field; 0 elsewhere")
    occupancy_cell_A: float = Field(
        4.0, ge=0, description="edge of an occupancy-grid cell in Å (at least 2 training-box pixels); 0 = 4 "
        "training-box pixels whatever the pixel size")
    occupancy_margin: int = Field(1, ge=0, description="cells the occupied region is grown by")
    occupancy_refresh: int = Field(10000, ge=1, description="images between re-estimates of the occupancy grid "
                                   "(the first after 1000 images or the first epoch; the gaps double from there "
                                   "until they reach this)")
    coarse_epochs: int | None = Field(
        None, ge=0, description="first epochs trained at half the training box (coarse-to-fine; each costs about a "
        "quarter of a full one); default: a sixth of the epochs, at most 3; 0 = none")
    kmeans: int = Field(10, ge=1, description="k-means classes in latent space")
    pcs: int = Field(2, ge=0, description="principal components to make volume series along")
    pc_steps: int = Field(10, ge=2, description="maps per principal-component series")
    map_box: int | None = Field(None, ge=8, description="box of the output maps and mask (default: the particles' "
                                "box, at their pixel size; the training box is faster and smaller)")
    mask_threshold: float = Field(0.5, gt=0, lt=1, description="solvent mask: initial threshold as a fraction of "
                                  "the 99.99th percentile of the maximum over the consensus and k-means maps")
    mask_extend: float | None = Field(None, ge=0, description="solvent mask: binary extension in pixels of the output "
                                      "maps (relion_mask_create --extend_inimask); default: one training-box pixel")
    mask_soft_edge: float | None = Field(None, ge=0, description="solvent mask: raised-cosine edge width in pixels of "
                                         "the output maps (relion_mask_create --width_soft_edge); default: two "
                                         "training-box pixels")
    gpus: str = Field("", description="comma-separated GPU ids; several = one data-parallel worker per GPU (NCCL); empty = CPU, or the first GPU if any")
    ranks: int | None = Field(None, ge=1, description="data-parallel CPU worker processes (gloo) when 'gpus' is empty (testing, CPU nodes); empty = 1, or one per GPU of 'gpus'")
    seed: int = Field(0, description="random seed (same seed, same result)")
    amp: bool = Field(True, description="bf16 where the hardware multiplies it natively: autocast on GPUs of compute "
                                        "capability >= 8.0, the point head's products on CPUs with AVX512-BF16 or AMX")
    threads: int | None = Field(None, ge=1, description="CPU threads for torch (with several workers: shared by the workers on one machine)")

    @field_validator("train_box", "map_box", "encoder_box")
    @classmethod
    def _even(cls, v: int | None) -> int | None:
        if v is not None and v % 2:
            raise ValueError("must be an even number of pixels")
        return v

    @classmethod
    def from_strings(cls, values: dict[str, str | None], *, source: str = "parameters") -> "JobConfig":
        """Build from ``--label value`` strings; a bare flag (value None or "") means True for booleans."""
        typed: dict[str, Any] = {}
        for key, raw in values.items():
            name = key.replace("-", "_")
            if name not in cls.model_fields:
                known = ", ".join(sorted(cls.model_fields))
                raise JobConfigError(f"{source}: unknown parameter '{key}' (known: {known})")
            typed[name] = _coerce(cls.model_fields[name].annotation, raw, name, source)
        try:
            return cls(**typed)
        except ValidationError as err:
            first = err.errors()[0]
            loc = ".".join(str(x) for x in first["loc"])
            raise JobConfigError(f"{source}: parameter '{loc}' = {values.get(loc)!r}: {first['msg']}") from None

    @classmethod
    def help_table(cls) -> str:
        lines = []
        for name, f in cls.model_fields.items():
            default = "" if f.default is None else f.default
            lines.append(f"  --{name:<12} {str(default):<8} {f.description}")
        return "\n".join(lines)

    def for_particles(self, has_poses: bool, explicit: bool,
                      missing: str = "the particles have no orientations") -> "JobConfig":
        """The one pose rule of every entry point (CLI, RELION, cryoSPARC, ``run_job``).

        Particles without orientations can only train with the orientation encoder, so ``poses`` becomes
        ``predict``; a mode the user chose explicitly is not overridden silently: it is an error that says
        what is missing (``missing``, e.g. which STAR columns). Returns a new config; ``self`` is unchanged.
        """
        if has_poses or self.poses == "predict":
            return self
        if explicit:
            raise JobConfigError(f"poses = {self.poses} needs particle orientations, but {missing}; "
                                 "use poses = predict")
        return self.model_copy(update={"poses": "predict"})

    def gpu_ids(self) -> list[int]:
        return [int(x) for x in self.gpus.replace(" ", "").split(",") if x != ""]


def parse_yes_no(raw: str | None, name: str, source: str = "parameters") -> bool:
    """RELION's and the command line's yes/no values; a bare label (None or "") means yes."""
    if raw in (None, ""):
        return True
    low = raw.strip().lower()
    if low in ("1", "true", "yes", "y", "on"):
        return True
    if low in ("0", "false", "no", "n", "off"):
        return False
    raise JobConfigError(f"{source}: parameter '{name}' expects yes/no, got {raw!r}")


def _coerce(annotation: Any, raw: str | None, name: str, source: str) -> Any:
    if annotation is bool:
        return parse_yes_no(raw, name, source)
    if raw is None:
        raise JobConfigError(f"{source}: parameter '{name}' needs a value")
    return raw.strip()
