"""The demo's Classifier guidance tab: unguided, naive classifier guidance and EluCD from the same start noise."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from .defaults import PAPER_CLASSIFIER_SCALE
from .demo_base import DemoBase, OUTPUT_IMAGE, Number, Slider, _ui_errors, log
from .jobs import JobError, to_pil


#: Largest classifier scale the Classifier guidance tab accepts.
MAX_CLASSIFIER_SCALE = 100.0

#: Where that tab's scale slider starts on other models than the embedded one: the official classifier_scale of
#: the EluCD DDPM script (on the embedded model: the scale of guidekit.toy.RECOMMENDED_ELUCD).
DEFAULT_CLASSIFIER_SCALE = PAPER_CLASSIFIER_SCALE

GET_CLASSIFIER = ("reinstall guidekit (its package ships it in guidekit/assets), or give the folder of any "
                  "transformers image classifier (config.json, weights, preprocessor_config.json)")


def embedded_classifier_path() -> Optional[Path]:
    """The embedded classifier's folder, or None when this guidekit has none or it is not installed."""
    try:
        from guidekit.toy import default_classifier_path

        path = Path(default_classifier_path())
    except (ImportError, AttributeError, OSError):  # FileNotFoundError: not installed
        return None
    return path if (path / "config.json").is_file() else None


def classifier_reading(clf, image, target: int) -> tuple[int, float, float]:
    """(top class id, its probability, probability of `target`) of one float image (H, W, 3) in [0, 1]."""
    import numpy as np
    import torch

    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)[None] * 2.0 - 1.0
    with torch.no_grad():
        probs = clf.eval()(x).float().softmax(-1)[0]
    top = int(probs.argmax())
    return top, float(probs[top]), float(probs[target])


def judge_reading(image) -> str:
    """The toy world judge's reading of one image: shape colour and shape ("no shape" when it finds none)."""
    from guidekit.toy.judge import judge

    j = judge(image)
    if j.colour is None:
        return "no shape"
    # the strict judge may find a colour but no shape it trusts (shape None)
    return f"{j.colour}, {j.shape or 'no shape'}"


def classifier_start(choices: list[str], embedded_classifier: bool) -> tuple[Optional[str], int]:
    """Where the tab's class and seed start: with the embedded classifier, the measured pick
    (demo_measure.CLASSIFIER_DEFAULT); with any other, its first class and seed 0.

    Args:
        choices: the classifier's class names in id order (empty when none is loaded).
        embedded_classifier: whether `choices` are the embedded classifier's."""
    from .demo_measure import CLASSIFIER_DEFAULT

    if embedded_classifier and CLASSIFIER_DEFAULT["label"] in choices:
        return CLASSIFIER_DEFAULT["label"], CLASSIFIER_DEFAULT["seed"]
    return (choices[0] if choices else None), 0


def _class_name(clf, index: int) -> str:
    names = clf.id2label or {}
    return names.get(index, str(index))


def classifier_tab_available(pipe) -> bool:
    """Whether the Classifier guidance tab runs on `pipe`: SD 1.x/2.x pipelines only."""
    try:
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        from guidekit import EluCD
    except ImportError:
        return False
    return EluCD is not None and isinstance(pipe, StableDiffusionPipeline) and \
        not isinstance(pipe, StableDiffusionXLPipeline)


def _classifier_tab(backend: DemoBase, queue: dict):
    import gradio as gr

    lim = backend.limits
    default = embedded_classifier_path()
    choices: list[str] = []
    if default is not None:
        try:
            choices = backend.classifier_labels("")
        except ValueError:  # a broken install: the textbox still takes another folder
            log.exception("the embedded classifier cannot be loaded")
            default = None
    # The sliders start at the request's defaults: on the embedded model with the embedded classifier, its
    # recommended settings and sampler
    start_label, start_seed = classifier_start(choices, default is not None)
    resolved = backend.defaults("classifier", prompt="", classifier=str(default) if default is not None else "")
    default_scale = float(resolved.classifier["scale"])
    default_steps = min(resolved.steps, lim.max_steps)
    if resolved.classifier_recommended:
        scale_origin = ("the embedded model's recommended scale with the embedded classifier "
                        "(guidekit.toy.RECOMMENDED_ELUCD).")
        kind = str(resolved.scheduler).upper()
        steps_origin = (f" Default: the recommended sampler's steps ({kind}, guidekit.toy.RECOMMENDED_ELUCD_SAMPLER), "
                        "which the embedded classifier's three runs use.")
    else:
        scale_origin, steps_origin = "the official classifier_scale of the EluCD DDPM script.", ""
    with gr.Tab("Classifier guidance"):
        gr.Markdown("Steer an unconditional image (empty prompt, guidance scale 1, as in the EluCD paper) toward "
                    "a class of an off-the-shelf image classifier: no guidance, naive classifier guidance and EluCD "
                    "(calibrated: joint and marginal temperatures, sine-boosted schedule, and Softplus-smoothed "
                    "ReLUs where its settings ask for them) side by side from the same start noise, each with the "
                    "classifier's reading" + (" and the toy world judge's reading (colour, shape)." if backend.embedded
                                               else "."))
        if default is None:
            gr.Markdown("No embedded classifier here: give the folder of a transformers image classifier below "
                        "(press Enter to load its classes). To get the embedded one: " + GET_CLASSIFIER + ".")
        with gr.Row():
            with gr.Column(scale=2):
                path = gr.Textbox(label="Classifier", value="", placeholder=str(default) if default else
                                  "folder of a transformers image classifier",
                                  info="A local folder of a transformers image classifier with its "
                                       "preprocessor_config.json. Empty: the embedded classifier"
                                       + ("." if default else " (not installed here).") +
                                       " Press Enter to load its classes.", elem_id="clf-path")
                label = gr.Dropdown(choices=choices, value=start_label, label="Class",
                                    allow_custom_value=True, elem_id="clf-label",
                                    info="The class to steer toward (a name from the classifier's id2label, or an id).")
                scale = Slider(0.0, MAX_CLASSIFIER_SCALE, value=default_scale, step=0.5,
                               label=f"Classifier scale s, default {default_scale:g}",
                               info="Strength of both corrections; 0 gives the unguided image. Default: "
                                    + scale_origin, elem_id="clf-scale")
                seed = Number(label="Seed", value=start_seed, precision=0, minimum=0, maximum=2**31 - 1,
                              info="Same seed, same start noise for all three images."
                                   + (f" Default with the embedded classifier: {start_label}, seed {start_seed}, "
                                      "where a measured table shows EluCD reading right and the unguided image "
                                      "not." if start_seed else ""), elem_id="clf-seed")
                steps = Slider(1, lim.max_steps, value=default_steps, step=1, label="Steps",
                               info=f"Denoising steps (this demo allows up to {lim.max_steps})." + steps_origin,
                               elem_id="clf-steps")
                button = gr.Button("Generate", variant="primary", elem_id="clf-button")
            with gr.Column(scale=3):
                with gr.Row():
                    outs = [gr.Image(label=name, type="pil", format="png", interactive=False, elem_id=f"clf-{key}",
                                     **OUTPUT_IMAGE)
                            for key, name in (("unguided", "Unguided"), ("naive", "Naive classifier guidance"),
                                              ("elucd", "EluCD"))]
                summary = gr.Markdown(elem_id="clf-summary")

        def load_classes(folder, current):
            names = backend.classifier_labels(folder)
            # leaving the folder box reloads the classes: a class the user chose stays if this classifier has it
            keep = current in names or isinstance(current, str) and current.strip().isdigit() and \
                int(current) < len(names)
            return gr.Dropdown(choices=names, value=current if keep else names[0] if names else None)

        for event in (path.submit, path.blur):
            event(_ui_errors(load_classes), [path, label], [label], api_name=False, **queue)
        button.click(_ui_errors(backend.classifier_guidance), [path, label, scale, seed, steps], [*outs, summary],
                     api_name="classifier_guidance", **queue)


class ClassifierTab:
    """The Classifier guidance tab's work: unguided, naive classifier guidance and EluCD."""

    _classifier: Optional[tuple[str, object]] = None  # (path, ClassifierCache): the last one used

    def classifier_cache(self, classifier):
        """The path of `classifier` (empty: the embedded classifier) and a cache holding it, loaded once; only
        the last classifier asked for stays loaded."""
        from .jobs import ClassifierCache

        path = (classifier or "").strip() if isinstance(classifier, str) or classifier is None else None
        if path is None:
            raise JobError(f"classifier: expected a folder path, got {classifier!r}")
        if not path:
            found = embedded_classifier_path()
            if found is None:
                raise JobError("classifier: the embedded classifier is not installed; " + GET_CLASSIFIER)
            path = str(found)
        if self._classifier is None or self._classifier[0] != path:
            cache = ClassifierCache()
            cache.get(path)  # raises JobError naming the path
            self._classifier = (path, cache)
        return self._classifier

    def classifier_labels(self, classifier) -> list[str]:
        """The class names of `classifier` (empty: the embedded one) in id order; ids when it has no names."""
        path, cache = self.classifier_cache(classifier)
        clf = cache.get(path)
        names = clf.id2label or {}
        if names:
            return [names[k] for k in sorted(names)]
        n = clf.num_labels or 0
        return [str(i) for i in range(n)]

    def classifier_guidance(self, classifier, label, scale, seed, steps):
        """Unguided, naive classifier guidance (`guidekit.ClassifierGuidance`) and EluCD (`guidekit.EluCD`) from
        the same start noise, unconditional as in the EluCD paper (empty prompt, guidance scale 1), at the
        model's native size (at most the demo's size limit): (three images, Markdown readings).

        Each image is read by the classifier (top class and its probability, and the probability of the
        requested class) and, on the embedded model, by the toy world's judge (shape colour and shape)."""
        import guidekit
        import torch
        from guidekit.checks import check_number
        from guidekit.guidance.elucd import check_elucd_scheduler

        from .defaults import scheduler_for, using_sampler
        from .jobs import resolve_classifier

        self.check_method("elucd")
        if label is None or (isinstance(label, str) and not label.strip()):
            raise JobError("class: pick the class to steer toward")
        path, cache = self.classifier_cache(classifier)
        target = resolve_classifier({"classifier": path, "label": label}, cache)["label"]
        scale = check_number("classifier scale", scale, 0.0, MAX_CLASSIFIER_SCALE)
        size = min(self.default_size, self.limits.max_size) // self.factor * self.factor
        params, seed = self.params("cfg", "an image", None, seed, steps, size, size, 1.0)
        clf = cache.get(path)
        # The request's defaults: with the embedded classifier on the embedded model, its recommended settings and
        # sampler, for all three runs; unconditional (empty prompt), so guidance scale 1
        settings = {calibration: self.defaults("classifier", prompt="", classifier=path, calibration=calibration,
                                               steps=params["steps"], classifier_scale=scale)
                    for calibration in ("plain", "elucd")}
        chosen = settings["elucd"]
        recommended, sampler = chosen.classifier_recommended, chosen.sampler
        # the hooks' own refusal of the sampler, before the unguided run
        check_elucd_scheduler(scheduler_for(self.pipe, sampler["scheduler"], sampler["scheduler_kwargs"]) if sampler
                              else self.pipe.scheduler)
        # CFG and APG give the conditional prediction at w <= 1: the slot needs a hook only above it
        slot = [] if chosen.guidance_scale <= 1 else \
            [guidekit.APG(**chosen.apg) if chosen.method == "apg" else guidekit.CFG()]
        runs = [("Unguided", None, None), ("Naive (ClassifierGuidance)", guidekit.ClassifierGuidance, "plain"),
                ("EluCD", guidekit.EluCD, "elucd")]
        images, rows = [], []
        for name, cls, calibration in runs:
            hooks = slot + ([] if cls is None else [cls(clf, target, **settings[calibration].classifier)])
            kwargs = {"hooks": hooks} if hooks else {}
            t0 = time.perf_counter()
            with using_sampler(self.pipe, sampler) as scheduler:
                sampler_name = type(scheduler).__name__
                # one generator per run: the same start noise (and DDPM step noise) for all three
                out = self.pipe(prompt="", num_inference_steps=chosen.steps, guidance_scale=chosen.guidance_scale,
                                width=params["width"], height=params["height"], output_type="np",
                                generator=torch.Generator("cpu").manual_seed(seed), **kwargs)
            dt = time.perf_counter() - t0
            image = to_pil(out.images)[0]
            images.append(image)
            top, p_top, p_target = classifier_reading(clf, out.images[0], target)
            judged = f" | {judge_reading(image)}" if self.embedded else ""
            rows.append(f"| **{name}** | {_class_name(clf, top)} ({p_top:.2f}) | {p_target:.2f}{judged} | {dt:.1f} s |")
        judge_head = (" | judge: colour, shape", "|---") if self.embedded else ("", "")
        if recommended:
            rec = chosen.classifier
            described = (f"{str(sampler['scheduler']).upper()} ({sampler_name}), {chosen.steps} steps, EluCD window "
                         f"{rec['start']:g}–{rec['stop']:g} (the embedded model's recommended settings, "
                         "guidekit.toy.RECOMMENDED_ELUCD; the naive run shares its window)")
        else:
            described = f"{sampler_name}, {chosen.steps} steps, the paper's defaults"
        summary = (f"Class **{_class_name(clf, target)}** (id {target}), classifier scale {scale:g}, seed {seed}, "
                   f"{described}, {params['width']}x{params['height']}, unconditional (empty prompt, "
                   f"guidance scale {chosen.guidance_scale:g}).\n\n"
                   f"| | classifier: top class (probability) | p(requested class){judge_head[0]} | time |\n"
                   f"|---|---|---{judge_head[1]}|---|\n" + "\n".join(rows) +
                   "\n\nThe same start noise for all three; the classifier reads the final images."
                   + (" The judge reads the toy world's shapes by their pixels." if self.embedded else ""))
        return images[0], images[1], images[2], summary
