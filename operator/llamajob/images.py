"""The trainer image of a job: its own `spec.cluster.image`, or the operator's default for the
job's trainer family.

No trainer image is published, so there is no built-in default: the operator gets one per
family from `llamajob operator --trainer-image` (the chart's `trainerImage` values), and
`llamajob render` from its own `--trainer-image`. A family is a trainer target of the
repository's Dockerfile (`trainer-<family>`):

- ``neuron``: the torch backend on Neuron devices (trn2, trn3: TorchNeuron);
- ``trn1``: the nxd backend (NeuronX Distributed on torch-xla): trn1/trn1n, and trn2 with
  ``backend: nxd``;
- ``cuda``: the GPU instance types, and the ``cpu`` type (PyPI's torch runs on CPUs too).

`llamajob run` (local runs) never needs an image.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from .api import LlamaTrainingJob
from .jobfile import SpecError

TRAINER_FAMILIES: tuple[str, ...] = ("neuron", "trn1", "cuda")
IMAGE_FIELD = "spec.cluster.image"


def trainer_family(backend: str, device: str) -> str:
    """The Dockerfile trainer target (``trainer-<family>``) a job of this backend and device
    runs in."""
    if backend == "nxd":
        return "trn1"
    if device == "neuron":
        return "neuron"
    return "cuda"


def job_family(job: LlamaTrainingJob) -> str:
    from .plan import resolve_backend, resolve_device

    return trainer_family(resolve_backend(job.spec), resolve_device(job.spec))


def parse_trainer_images(values: Iterable[str]) -> dict[str, str]:
    """``[FAMILY=]IMAGE`` flag values -> {family: image}. An IMAGE without a family is the
    default of every family not named on its own (in any order). Raises ValueError."""
    every: str | None = None
    named: dict[str, str] = {}
    for value in values:
        family, sep, image = value.partition("=")
        if not sep:
            family, image = "", value
        image = image.strip()
        if not image or any(c.isspace() for c in image):
            raise ValueError(f"{value!r}: expected [FAMILY=]IMAGE, with IMAGE an image reference")
        if not family:
            if every is not None and every != image:
                raise ValueError(f"two images for every family: {every!r} and {image!r}")
            every = image
        elif family not in TRAINER_FAMILIES:
            raise ValueError(
                f"{value!r}: unknown trainer family {family!r}; families are "
                f"{', '.join(TRAINER_FAMILIES)} (the Dockerfile targets trainer-<family>)"
            )
        elif named.get(family, image) != image:
            raise ValueError(f"two images for family {family}: {named[family]!r} and {image!r}")
        else:
            named[family] = image
    if every is not None:
        return {family: named.get(family, every) for family in TRAINER_FAMILIES}
    return named


def missing_image(family: str) -> SpecError:
    """The problem of a job with no image of its own and no operator default for its family."""
    return SpecError(
        IMAGE_FIELD,
        f"no trainer image: the job does not set it and the operator has no default for its "
        f"trainer family {family!r}. No image is published: build and push one "
        f"(`docker build --target trainer-{family} -t <registry>/llamajob-trainer:0.1.0-{family} "
        f". && docker push ...`, docs/install.md, \"Building the images\"), then set "
        f"spec.cluster.image to it, or give the operator a default (Helm value "
        f"trainerImage.repository=<registry>/llamajob-trainer, or trainerImage.{family}; "
        f"`--trainer-image {family}=IMAGE`)",
    )


def with_trainer_image(
    job: LlamaTrainingJob, defaults: Mapping[str, str]
) -> tuple[LlamaTrainingJob, SpecError | None]:
    """``job`` with ``spec.cluster.image`` filled from ``defaults`` (family -> image) when it
    sets none; or the job unchanged and the problem when there is no image for it."""
    if job.spec.cluster.image:
        return job, None
    family = job_family(job)
    image = defaults.get(family)
    if not image:
        return job, missing_image(family)
    cluster = job.spec.cluster.model_copy(update={"image": image})
    spec = job.spec.model_copy(update={"cluster": cluster})
    return job.model_copy(update={"spec": spec}), None
