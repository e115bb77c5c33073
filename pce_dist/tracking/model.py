"""The trained model as an MLflow model: PyTorch flavour, signature, input example, safe copy.

``log_exported_model(export_file, run_id, uri)`` logs the model of a ``pce_dist.export``
file as the run's artifact ``model`` (an MLflow 3 logged model linked to the run), so
``mlflow.pytorch.load_model("runs:/<run id>/model")``, ``mlflow.pyfunc``, the model
registry (``tracking.register_as``) and ``mlflow models serve`` all see it.

What is logged:

* the flavour's own file: ``PCEClassifier`` (logits only: one tensor in, one out),
  pickled by MLflow's PyTorch flavour, with ``pce_dist`` itself as code (``code_paths``), so
  it loads where pce_dist is not installed. MLflow 3 would default to ``torch.export``
  (pt2, no pickle), but the dropless dispatch's per-expert batch sizes are data-dependent
  shapes that ``torch.export`` refuses, so the format is ``pickle``;
* signature: float32 ``[-1, C, H, W]`` images *after* the run's normalisation ->
  float32 ``[-1, K]`` logits; input example: one image at the data mean (zeros);
* metadata ``pce_dist``: what a caller needs to prepare an image (size, channels, mean,
  std, class names) -- ``pce_dist.predict`` reads it too;
* the export itself as ``extra_files`` (``model.safetensors``): ``pce_dist.predict`` and
  ``pce_dist.evaluate`` load a ``runs:/`` or ``models:/`` URI from that copy and never
  unpickle anything. ``mlflow.pytorch.load_model`` does unpickle (that is the flavour):
  use it on models from your own tracking store only.

Requirements are given, not inferred (MLflow would load the model in a subprocess to
guess them). MLflow checks the input example by loading the model it has just written
(ours, never a file handed in) through pyfunc; the code directory that prepends to
``sys.path`` is taken off again.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import re
import sys
from pathlib import Path
from typing import Any

from pce_dist.redact import redact
from pce_dist.tracking.client import CALL_LIMITS, SCRUB, bounded_http, process_tracking_uri, scrub_mlflow_logs

ARTIFACT = "model"  # runs:/<run id>/model
_REGISTRATION_WAIT_S = 30  # MLflow's default is 300 s; a local store is ready at once


def _requirements() -> list[str]:
    """What the pickled model needs at load time: torch and pce_dist's model-side imports."""
    torch_version = importlib.metadata.version("torch").split("+")[0]  # a local tag is no PyPI version
    return [f"torch=={torch_version}", "numpy", "pyyaml", "safetensors", "mlflow"]


def model_metadata(config: dict, class_names: list[str] | None, export_name: str) -> dict[str, Any]:
    """How to feed the model: the ``pce_dist`` entry of the MLmodel metadata."""
    model, data = config["model"], config["data"]
    return {"image_size": model["image_size"], "in_channels": model["in_channels"], "mean": list(data["mean"]),
            "std": list(data["std"]), "num_classes": model["num_classes"], "class_names": class_names,
            "kind": model["kind"], "export_file": export_name,
            "input": "float32 [B, C, H, W]: pixels / 255, then (x - mean) / std per channel"}


def log_exported_model(export_file: str | Path, run_id: str, tracking_uri: str, *, step: int = 0,
                       register_as: str = "") -> str:
    """Log ``export_file`` as the run's model ``runs:/<run_id>/model``; returns its ``models:/<model id>`` URI.

    Both URIs load it; the ``models:/`` one names this logged model even when the run has
    several (``export --mlflow`` run again logs a new one; ``runs:/`` resolves to one of them).

    ``step``: the model's optimizer step; MLflow attaches the run's metrics at that step
    (the final evaluation) to the logged model.

    Raises ``RuntimeError`` (URI redacted) when the store refuses or does not answer;
    ``ValueError`` for an export that cannot be read.
    """
    import mlflow
    import mlflow.pytorch
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    import pce_dist
    from pce_dist.export import read_export
    from pce_dist.model import PCEClassifier

    export_file = Path(export_file)
    exported = read_export(export_file)
    m = exported.model.cfg
    shape_CHW = (m.in_channels, m.image_size, m.image_size)
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *shape_CHW))]),
                               outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, m.num_classes))]))
    example_BCHW = np.zeros((1, *shape_CHW), dtype=np.float32)  # the data mean, normalised
    scrub_mlflow_logs()  # the flavour's modules are imported now
    sys_path = list(sys.path)  # the input-example check loads the model and prepends its code dir
    try:
        # Model.log resolves the store from the process's URI
        with process_tracking_uri(tracking_uri), bounded_http(CALL_LIMITS):
            # The logged model must sit in the run's experiment, where ``runs:/<run id>/model``
            # looks for it; log_model alone would create it in the process's active experiment
            # (experiment 0), so it is created here, with the run's params as MLflow would copy them.
            run = mlflow.MlflowClient().get_run(run_id)
            logged = mlflow.initialize_logged_model(name=ARTIFACT, source_run_id=run_id,
                                                    experiment_id=run.info.experiment_id, params=run.data.params)
            info = mlflow.pytorch.log_model(
                PCEClassifier(exported.model), name=ARTIFACT, run_id=run_id, signature=signature,
                input_example=example_BCHW, code_paths=[str(Path(pce_dist.__file__).parent)],
                extra_files=[str(export_file)], pip_requirements=_requirements(),
                metadata={"pce_dist": model_metadata(exported.config, exported.class_names, export_file.name)},
                registered_model_name=register_as or None, await_registration_for=_REGISTRATION_WAIT_S,
                step=step, model_id=logged.model_id, serialization_format="pickle")
    except Exception as exc:  # noqa: BLE001 -- MLflow raises many types; the caller gets one
        first_line = (str(exc).splitlines() or [""])[0][:300]
        raise RuntimeError(SCRUB.scrub(f"logging the model to {redact(tracking_uri)} failed: "
                                       f"{type(exc).__name__}: {first_line}")) from None
    finally:
        sys.path[:] = sys_path
    return info.model_uri


_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:/")  # runs:/, models:/, s3://, mlflow-artifacts:/, ...


def is_model_uri(spec: str) -> bool:
    """An MLflow model URI (``runs:/``, ``models:/``, ``s3://``, ...) or a local MLflow model directory."""
    return bool(_URI.match(spec)) or (Path(spec) / "MLmodel").is_file()


def download_export(model_uri: str, tracking_uri: str | None, dst: str | Path) -> Path:
    """The ``pce_dist.export`` file inside an MLflow model; nothing is unpickled.

    A local model directory is read in place; anything else is downloaded into ``dst``
    (the caller's temporary directory). ``tracking_uri``: the store a ``runs:/`` or
    ``models:/`` URI refers to (else ``MLFLOW_TRACKING_URI``; one of them is required, or
    MLflow would quietly open ``./mlflow.db``). Raises ``ValueError`` naming the URI when it
    is not a pce_dist model, ``RuntimeError`` when the store cannot give it.
    """
    import mlflow
    from mlflow.models import Model

    local = Path(model_uri)
    if not (local / "MLmodel").is_file():
        if model_uri.startswith(("runs:/", "models:/")) and not (tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")):
            raise ValueError(f"{model_uri}: say which tracking store it is in (--tracking-uri URI or "
                             "MLFLOW_TRACKING_URI)")
        scrub_mlflow_logs()  # MLflow's download warnings quote request URLs
        try:
            # the process's URI: MLflow 3.17 looks a ``models:/<model id>`` up in it whatever
            # ``tracking_uri=`` says
            uri_scope = process_tracking_uri(tracking_uri) if tracking_uri else contextlib.nullcontext()
            with uri_scope, bounded_http(CALL_LIMITS):
                local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst)))
        except Exception as exc:  # noqa: BLE001
            first_line = (str(exc).splitlines() or [""])[0][:300]
            raise RuntimeError(SCRUB.scrub(f"{model_uri}: cannot download the model: {type(exc).__name__}: "
                                           f"{first_line}")) from None
    mlmodel = Model.load(str(local / "MLmodel"))
    entry = (mlmodel.metadata or {}).get("pce_dist")
    extra = (mlmodel.flavors.get("pytorch") or {}).get("extra_files") or []
    if not entry:
        raise ValueError(f"{model_uri}: not a pce_dist model (its MLmodel has no 'pce_dist' metadata)")
    name = entry.get("export_file")
    found = [local / e["path"] for e in extra if Path(e.get("path", "")).name == name]
    if not found or not found[0].is_file():
        raise ValueError(f"{model_uri}: the model has no {name!r} among its extra files")
    return found[0]
