"""Classifier guidance in a job (EluCD, or plain classifier guidance): its fields, the classifiers a run loads
once, and the label resolved to a class id."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional

from .jobs_schema import JobError, Param


def parse_label(label: str):
    """`--label` as given: a string of decimal digits is a class id, anything else a class name."""
    text = label.strip()
    return int(text) if text.isdecimal() else label


#: Optional classifier guidance on top of the guidance method (EluCD or plain classifier guidance). A job
#: without `classifier` has none of these in its params, so its key is the one it had before they existed.
CLASSIFIER: dict[str, Param] = {p.name: p for p in [
    Param("classifier", str, None,
          "Local folder of a transformers image classifier (with its preprocessor_config.json) that steers each "
          "image toward `label`; a hub id works only with network access or the model in the local Hugging Face "
          "cache. Give it together with `label`. Default: no classifier guidance."),
    Param("label", str, None,
          "The class to steer toward: an id (an integer, or a string of digits) or a name from the classifier's "
          "id2label (case-insensitive). Required with `classifier`; recorded as the class id."),
    Param("classifier_scale", float, None,
          "Classifier scale s; 0 turns the correction off. Default: the scale of guidekit.toy.RECOMMENDED_ELUCD "
          "for the embedded classifier on the embedded model, else 1, the official classifier_scale of the EluCD "
          "DDPM script.", min=0.0, max=1000.0),
    Param("calibration", str, "elucd",
          "elucd: calibrated log-probability, the sine boost and (paper default) Softplus-smoothed ReLUs "
          "(guidekit.EluCD); "
          "plain: uncalibrated classifier guidance (guidekit.ClassifierGuidance). The embedded classifier on the "
          "embedded model gets guidekit.toy.RECOMMENDED_ELUCD (plain: its schedule, input and step window) and "
          "its sampler, guidekit.toy.RECOMMENDED_ELUCD_SAMPLER (ancestral DDPM); both are recorded in the job's "
          "params (classifier_settings, scheduler). Any other pair: the paper's defaults and the model's own "
          "scheduler.", choices=("elucd", "plain")),
]}


def _parse_classifier(raw: dict, where: str) -> dict:
    """The classifier fields of a job: {} without `classifier`, else all four (defaults filled, except
    `classifier_scale`: None until `resolve` knows the model and the classifier)."""
    given = {k: raw.get(k) for k in CLASSIFIER if raw.get(k) is not None}
    if not given:
        return {}
    if "classifier" not in given:
        names = ", ".join(given)
        raise JobError(f"{where}{names}: given without classifier; accepted: \"classifier\": a local folder of a "
                       "transformers image classifier, together with \"label\" (or remove them)")
    if "label" not in given:
        raise JobError(f"{where}label: required with classifier; accepted: a class id or name of the classifier")
    out = {}
    for p in CLASSIFIER.values():
        v = given.get(p.name)
        if p.name == "label":
            if isinstance(v, float) and v.is_integer():  # 1.0 from a spreadsheet
                v = int(v)
            if isinstance(v, bool) or not isinstance(v, (int, str)) or isinstance(v, str) and not v.strip():
                raise JobError(f"{where}label: expected a class id (an integer) or a class name, got {v!r}")
            out["label"] = v
        elif p.name == "classifier_scale":
            out[p.name] = None if v is None else p.check(v, where)
        else:
            out[p.name] = p.default if v is None else p.check(v, where)
    if not out["classifier"].strip():
        raise JobError(f"{where}classifier: expected a local folder or hub id of an image classifier, got ''")
    return out


class ClassifierCache:
    """Image classifiers by the path (or hub id) a job names: each is loaded once, and a failure once too.

    Also keeps one guidance hook per (classifier, label, scale, calibration): a hook serves any number of
    calls, and builds its smoothed copy of the classifier only once.
    """

    def __init__(self):
        self._classifiers: dict[str, Any] = {}  # path -> classifier, or the JobError message of a failed load
        self._hooks: dict[tuple, Any] = {}

    def get(self, path: str):
        """The classifier of `path` (a `guidekit.guidance.TransformersClassifier`); raises JobError if it cannot
        be loaded (the message names the path; the same message for every later job that names it)."""
        if path not in self._classifiers:
            try:
                self._classifiers[path] = self._load(path)
            except JobError as e:
                self._classifiers[path] = str(e)
        found = self._classifiers[path]
        if isinstance(found, str):
            raise JobError(found)
        return found

    @staticmethod
    def _load(path: str):
        from guidekit.guidance import TransformersClassifier

        local = Path(path).expanduser()
        if local.exists() and not local.is_dir():
            raise JobError(f"classifier: {path} is a file; accepted: a folder of a transformers image classifier "
                           "(config.json, weights, preprocessor_config.json)")
        if not local.exists() and not _HUB_ID.match(path):
            raise JobError(f"classifier: {path} is not a folder (nor a hub id like org/name); accepted: a local "
                           "folder of a transformers image classifier (config.json, weights, preprocessor_config.json)")
        hint = "" if local.exists() else \
            " (a hub id needs network access, or the model in the local Hugging Face cache; or pass a local folder)"
        try:
            return TransformersClassifier.from_pretrained(str(local) if local.exists() else path)
        except Exception as e:  # noqa: BLE001 - transformers' OSError/ValueError, a missing normalisation...
            raise JobError(f"classifier: cannot load {path!r}{hint}: {type(e).__name__}: {e}") from None

    def hook(self, params: dict):
        """The correction hook of resolved `params` (`label` a class id): `guidekit.EluCD` or
        `guidekit.ClassifierGuidance`."""
        import guidekit

        settings = params.get("classifier_settings") or {}
        key = (params["classifier"], params["label"], params["classifier_scale"], params["calibration"],
               json.dumps(settings, sort_keys=True))
        if key not in self._hooks:
            cls = guidekit.EluCD if params["calibration"] == "elucd" else guidekit.ClassifierGuidance
            self._hooks[key] = cls(self.get(params["classifier"]), params["label"], scale=params["classifier_scale"],
                                   **settings)
        return self._hooks[key]


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def resolve_classifier(params: dict, classifiers: Optional[ClassifierCache] = None, where: str = "") -> dict:
    """`params` with its `label` as the class id of its classifier (loaded through `classifiers`). Params
    without a classifier are returned unchanged. Raises JobError naming the line and the field."""
    if params.get("classifier") is None:
        return dict(params)
    classifiers = classifiers if classifiers is not None else ClassifierCache()
    try:
        classifier = classifiers.get(params["classifier"])
    except JobError as e:
        raise JobError(f"{where}{e}") from None
    from guidekit.guidance.classifiers import resolve_labels

    label = params["label"]
    try:
        index = resolve_labels(parse_label(label) if isinstance(label, str) else label, classifier.id2label, "label")
    except ValueError as e:
        raise JobError(f"{where}{e}") from None
    return {**params, "label": index}
