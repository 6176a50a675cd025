"""A grid of APG settings (r, β, η) against CFG on the embedded model: how `guidekit.toy.RECOMMENDED_APG` is chosen.

APG's radius r is a raw L2 norm over the whole latent, so the value that suits SDXL's 128×128×4 latents
(r = 15) is far too large for the toy model's 16×16×4 ones: it never rescales anything.

Two prompt sets that share no caption and no noise seed: every setting is measured on the *selection* set and
the rule (`pick_recommended`) picks from those rows alone; the best-ranked settings are then measured on the
*check* set, which played no part in the choice, to say whether the choice holds on prompts it never saw.
Neither set shares a noise seed with the accuracy table's prompts (`evaluate.eval_prompts`, seeds 1000 + i).
Every accuracy comes from `guidekit.toy.judge` (strict reading).
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..metrics import clipped_fraction, mean_saturation
from . import world
from .judge import fidelity_summary, judge_batch, score
from .world import parse_caption

__all__ = ["SATURATION_SCALES", "CHECK_SCALES", "PromptSet", "selection_set", "check_set", "default_grid", "render",
           "measure", "world_reference", "run_grid", "Rule", "rank_settings", "pick_recommended", "verdicts",
           "largest_clean_scale", "select_and_check"]

#: The scales of the rule's saturation condition: the high ones APG is for. Not the default scale 3: there APG's
#: rescaling hardly acts, every setting of the grid gives the same saturation (within 0.001 on the selection
#: prompts), so the condition would say nothing about the setting and only judge the prompt set's sampling noise.
SATURATION_SCALES = (10.0, 15.0, 20.0)
#: Check scales: the selection's plus the ones between, so the check also says where textures start to be invented.
CHECK_SCALES = (3.0, 5.0, 7.5, 10.0, 15.0, 20.0)
#: Draws of each caption in the world's reference. One draw per prompt leaves the reference's mean saturation
#: at the mercy of the colours drawn (48 prompts: 0.68 to 0.76 over nine draws, where all 270 captions give 0.72),
#: as large as the tolerance itself; 32 draws bring that spread down to about 0.004.
WORLD_DRAWS = 32


@dataclass(frozen=True)
class PromptSet:
    """A named set of prompts; prompt ``i`` is sampled from the noise of ``seed + i``."""

    name: str
    prompts: tuple
    seed: int
    shuffle: int


def _shuffled_captions(shuffle: int) -> list[str]:
    caps = world.all_captions()
    return [caps[j] for j in np.random.default_rng(shuffle).permutation(len(caps))]


def selection_set(n: int = 48) -> PromptSet:
    """The selection prompts: the first ``n`` of a shuffle of the 270 captions, noise seeds 7000 + i."""
    if not 1 <= n <= 270:
        raise ValueError(f"n: got {n}; accepted: 1 to 270 (the grammar has 270 captions)")
    return PromptSet("selection", tuple(_shuffled_captions(20261128)[:n]), 7000, 20261128)


def check_set(n: int = 96, exclude: Sequence[str] = ()) -> PromptSet:
    """The check prompts: ``n`` captions of another shuffle that are not in ``exclude`` (the selection's),
    noise seeds 9000 + i, so neither a caption nor a seed is shared with the selection set."""
    pool = [c for c in _shuffled_captions(20261129) if c not in set(exclude)]
    if not 1 <= n <= len(pool):
        raise ValueError(f"n: got {n}; accepted: 1 to {len(pool)} (the captions the selection set leaves)")
    return PromptSet("check", tuple(pool[:n]), 9000, 20261129)


def default_grid() -> list[dict]:
    """The (norm_threshold, momentum, eta) settings measured on the selection set.

    Every r of 1-8 with every β of 0 to -0.75 at η = 0; η = 0.5 (half the parallel component kept, which
    raises the saturation) at the small radii, whose saturation falls with w; and the paper's SDXL values.
    """
    grid = [dict(norm_threshold=r, momentum=b, eta=0.0)
            for r, b in itertools.product((1.0, 2.0, 3.0, 4.0, 6.0, 8.0), (0.0, -0.25, -0.5, -0.75))]
    grid += [dict(norm_threshold=r, momentum=b, eta=0.5) for r, b in itertools.product((1.0, 2.0, 4.0), (0.0, -0.5))]
    grid.append(dict(norm_threshold=15.0, momentum=-0.5, eta=0.0))
    return grid


@torch.no_grad()
def render(pipe, prompts: Sequence[str], scale: float, hooks, seed: int, steps: int = 25, batch: int = 48) -> np.ndarray:
    """Images float (N, 64, 64, 3) in [0, 1].

    Args:
        pipe: a `GuidedStableDiffusionPipeline` of the toy model.
        prompts: captions.
        scale: guidance scale w.
        hooks: the guidance hooks of the call (`guidekit.CFG()` or `guidekit.APG(...)`).
        seed: prompt ``i`` starts from the noise of ``torch.Generator().manual_seed(seed + i)``.
        steps: DDIM steps.
        batch: prompts per pipeline call.
    """
    out = []
    for lo in range(0, len(prompts), batch):
        chunk = list(prompts[lo:lo + batch])
        noise = torch.stack([torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(seed + lo + i))
                             for i in range(len(chunk))]).to(pipe.device)
        out.append(pipe(chunk, num_inference_steps=steps, guidance_scale=scale, hooks=hooks, latents=noise,
                        output_type="np", height=64, width=64).images)
    return np.concatenate(out)


def measure(images: np.ndarray, prompts: Sequence[str]) -> dict:
    """Judged accuracies, shape fidelity, saturation and clipped fraction of a set of images.

    ``texture`` counts every prompt (a texture nobody asked for is wrong), ``texture_asked`` only those that ask
    for one, ``invented`` is the fraction of the prompts asking for none on which the judge reads a texture
    (``plain`` of them).
    """
    judgements = judge_batch(images)
    acc = score(images, prompts, judgements)
    plain = [j.texture is not None for j, p in zip(judgements, prompts) if parse_caption(p)["texture"] is None]
    return {
        "all3": acc["all3"], "texture": acc["texture"], "texture_asked": acc["texture_asked"],
        "invented": float(np.mean(plain)) if plain else float("nan"), "plain": len(plain),
        "fidelity": fidelity_summary(judgements)["fidelity"],
        "saturation": mean_saturation(images), "clipped": clipped_fraction(images),
    }


def world_reference(prompt_set: PromptSet, draws: int = WORLD_DRAWS) -> dict:
    """The same measures on the world's own images of the prompt set's captions, in the world version the model
    was trained on: ``draws`` images of each caption (layout and colours of draw ``k`` from world seed
    ``seed + i + 10_000·k``, all below 10⁶, which training never uses), so that the reference is the captions'
    expected saturation rather than one draw of the colours."""
    from . import MODEL_WORLD_VERSION

    if draws < 1:
        raise ValueError(f"draws: got {draws}; accepted: 1 or more")
    prompts = list(prompt_set.prompts) * draws
    seeds = [prompt_set.seed + i + 10_000 * k for k in range(draws) for i in range(len(prompt_set.prompts))]
    images = np.stack([world.render(world.as_version(world.scene_from_caption(c, seed=s), MODEL_WORLD_VERSION))[0]
                       for c, s in zip(prompts, seeds)])
    return {**measure(images.astype(np.float64) / 255.0, prompts), "draws": draws}


def _key(row: dict) -> tuple:
    return (row["set"], row["prompts"], row["seed"], row["steps"], row["model"], row["method"],
            row.get("norm_threshold"), row.get("momentum"), row.get("eta"), float(row["scale"]))


def _load_checkpoint(path: Optional[Path]) -> dict:
    if path is None or not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {_key(r): r for r in rows}


def run_grid(pipe, prompt_set: PromptSet, settings: Sequence[Optional[dict]], scales: Sequence[float],
             steps: int = 25, model: str = "embedded", checkpoint: Optional[str | Path] = None,
             log: Callable[[str], None] = print) -> dict:
    """Every setting at every scale on one prompt set, plus the world's reference.

    Args:
        pipe: the pipeline (`guidekit.toy.evaluate.load_pipeline`).
        prompt_set: the prompts and their noise seeds.
        settings: `None` for CFG, else `guidekit.APG` keyword arguments (eta, norm_threshold, momentum).
        scales: guidance scales.
        steps: DDIM steps.
        model: the model's name, recorded in each row so that a checkpoint of other weights is not reused.
        checkpoint: a JSON-lines file; each measured row is appended to it at once, and a row already in it
            (same set, prompts, seed, steps, model, setting and scale) is read back instead of measured again.
        log: where progress lines go.
    """
    import guidekit

    path = Path(checkpoint) if checkpoint is not None else None
    done = _load_checkpoint(path)
    rows = []
    for setting, scale in itertools.product(settings, scales):
        row = {"set": prompt_set.name, "prompts": len(prompt_set.prompts), "seed": prompt_set.seed, "steps": steps,
               "model": model, "method": "cfg" if setting is None else "apg", "scale": float(scale), **(setting or {})}
        if _key(row) in done:
            rows.append(done[_key(row)])
            continue
        t0 = time.perf_counter()
        hooks = [guidekit.CFG()] if setting is None else [guidekit.APG(**setting)]
        images = render(pipe, prompt_set.prompts, scale, hooks, prompt_set.seed, steps)
        row.update(measure(images, prompt_set.prompts), seconds=round(time.perf_counter() - t0, 1))
        rows.append(row)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
        log(f"{prompt_set.name} {_label(row)} w={scale:g}: all3 {row['all3']:.3f} texture {row['texture']:.3f} "
            f"invented {row['invented']:.3f} saturation {row['saturation']:.3f} clipped {row['clipped']:.4f} "
            f"({row['seconds']:.0f} s)")
    return {"set": prompt_set.name, "prompts": list(prompt_set.prompts), "seed": prompt_set.seed,
            "shuffle": prompt_set.shuffle, "steps": steps, "scales": [float(s) for s in scales], "rows": rows,
            "world": world_reference(prompt_set)}


def _label(row: dict) -> str:
    if row["method"] == "cfg":
        return "CFG"
    return f"APG(r={row['norm_threshold']:g}, β={row['momentum']:g}, η={row['eta']:g})"


def _setting(row: dict) -> tuple:
    return (row["norm_threshold"], row["momentum"], row["eta"])


@dataclass(frozen=True)
class Rule:
    """What a recommended APG setting must do on a prompt set.

    Args:
        saturation_tolerance: largest |saturation − the world's| allowed at every scale of ``saturation_scales``.
        saturation_scales: the scales the saturation condition covers (see `SATURATION_SCALES` for why not 3).
        texture_margin: the most the setting's texture accuracy (every prompt counted) may fall below CFG's at
            ``texture_scale``.
        texture_scale: the default guidance scale, where the texture condition is read.
    """

    saturation_tolerance: float = 0.03
    saturation_scales: tuple = SATURATION_SCALES
    texture_margin: float = 0.05
    texture_scale: float = 3.0

    def scales(self) -> list[float]:
        """The scales the rule reads: the saturation condition's and the texture condition's."""
        return sorted({float(s) for s in self.saturation_scales} | {float(self.texture_scale)})

    def text(self) -> str:
        scales = "each of w = " + ", ".join(f"{s:g}" for s in self.saturation_scales)
        return (f"mean saturation within {self.saturation_tolerance:g} of the world's images of the same captions at "
                f"{scales}, and texture accuracy (every prompt counted, so an invented texture is wrong) at most "
                f"{self.texture_margin * 100:g} points below CFG's at w = {self.texture_scale:g}; among the settings "
                "that meet both, the best mean all-three accuracy over the grid's scales (ties: shape fidelity). "
                "If none meets both: among those that meet the texture condition (else all), the smallest worst "
                "saturation gap.")


def _cfg_texture(result: dict, scale: float) -> float:
    for row in result["rows"]:
        if row["method"] == "cfg" and abs(row["scale"] - scale) <= 1e-9 * max(1.0, abs(scale)):
            return row["texture"]
    raise ValueError(f"result: no CFG row at w = {scale:g}, which the rule's texture condition compares against")


def verdicts(result: dict, rule: Rule = Rule()) -> list[dict]:
    """How each APG setting of a `run_grid` result fares under ``rule``: worst saturation gap over the rule's
    scales, whether it meets each condition, its mean all-three accuracy and shape fidelity over all scales."""
    world_sat = result["world"]["saturation"]
    cfg_texture = _cfg_texture(result, rule.texture_scale)
    by_setting: dict = {}
    for row in result["rows"]:
        if row["method"] == "apg":
            by_setting.setdefault(_setting(row), []).append(row)
    wanted = [float(s) for s in rule.saturation_scales]
    out = []
    for key, rows in by_setting.items():
        at = {float(r["scale"]): r for r in rows}
        gaps = [abs(at[s]["saturation"] - world_sat) for s in wanted if s in at]
        texture = at[rule.texture_scale]["texture"] if rule.texture_scale in at else float("nan")
        out.append({
            "norm_threshold": key[0], "momentum": key[1], "eta": key[2],
            "worst_gap": max(gaps) if gaps else float("inf"),
            # a setting not measured at some scale of the rule cannot be said to keep the saturation there
            "keeps_saturation": len(gaps) == len(wanted) and max(gaps) <= rule.saturation_tolerance,
            "texture": texture, "cfg_texture": cfg_texture,
            "keeps_texture": bool(texture >= cfg_texture - rule.texture_margin),
            "all3": float(np.mean([r["all3"] for r in rows])),
            "fidelity": float(np.nanmean([r["fidelity"] for r in rows])),
        })
    for v in out:
        v["meets_rule"] = v["keeps_saturation"] and v["keeps_texture"]
    return out


def rank_settings(result: dict, rule: Rule = Rule()) -> list[dict]:
    """`verdicts` in the rule's order of preference: the settings that meet the rule, most accurate first; then
    the fallback order (those meeting the texture condition first, smallest worst saturation gap first)."""
    def order(v):
        if v["meets_rule"]:
            return (0, -v["all3"], -v["fidelity"], v["worst_gap"])
        return (1, not v["keeps_texture"], v["worst_gap"], -v["all3"])

    return sorted(verdicts(result, rule), key=order)


def pick_recommended(result: dict, rule: Rule = Rule()) -> dict:
    """The APG setting to recommend from a `run_grid` result, as `guidekit.APG` keyword arguments (see `Rule`)."""
    ranked = rank_settings(result, rule)
    if not ranked:
        raise ValueError("result: no APG rows to choose from")
    best = ranked[0]
    return {"eta": best["eta"], "norm_threshold": best["norm_threshold"], "momentum": best["momentum"]}


def largest_clean_scale(result: dict, setting: Optional[dict], allowed: float = 0.0) -> Optional[float]:
    """The largest scale up to which (every measured scale at or below it) ``setting`` (`None`: CFG) invents a
    texture on at most ``allowed`` of the prompts that ask for none; `None` if it does so already at the
    smallest scale."""
    rows = sorted((r for r in result["rows"] if (r["method"] == "cfg") == (setting is None)
                   and (setting is None or _setting(r) == (setting["norm_threshold"], setting["momentum"],
                                                           setting["eta"]))), key=lambda r: r["scale"])
    clean = None
    for row in rows:
        if row["invented"] > allowed:
            break
        clean = row["scale"]
    return clean


def select_and_check(pipe, selection: PromptSet, check: PromptSet, grid: Optional[list[dict]] = None,
                     check_scales: Sequence[float] = CHECK_SCALES,
                     check_top: int = 3, rule: Rule = Rule(), steps: int = 25, model: str = "embedded",
                     checkpoint: Optional[str | Path] = None, log: Callable[[str], None] = print) -> dict:
    """Measure the grid on the selection prompts, pick by ``rule``, then measure on the check prompts the
    ``check_top`` best-ranked settings and the shipped `guidekit.toy.RECOMMENDED_APG` (CFG alongside in both).

    Args:
        pipe: the pipeline (`guidekit.toy.evaluate.load_pipeline`).
        selection: the prompts the choice is made on.
        check: prompts sharing no caption or seed with ``selection``.
        grid: APG settings (`default_grid()` if `None`).
        check_scales: check scales; the rule's are added if missing, so that it can be read there too.
        check_top: how many of the best-ranked settings go to the check.
        rule: the `Rule`; the selection is measured at its scales.
        steps: DDIM steps.
        model: the model's name (see `run_grid`).
        checkpoint: JSON-lines file of measured rows (see `run_grid`).
        log: where progress lines go.
    """
    from . import RECOMMENDED_APG

    if set(selection.prompts) & set(check.prompts) or selection.seed == check.seed:
        raise ValueError("check: shares captions or noise seeds with the selection set; it must be held out")
    if check_top < 1:
        raise ValueError(f"check_top: got {check_top}; accepted: 1 or more")
    grid = default_grid() if grid is None else list(grid)
    scales = rule.scales()
    check_scales = sorted({float(s) for s in check_scales} | set(scales))
    sel = run_grid(pipe, selection, [None] + grid, scales, steps, model, checkpoint, log)
    ranked = rank_settings(sel, rule)
    recommended = pick_recommended(sel, rule)
    to_check = [{k: v[k] for k in ("eta", "norm_threshold", "momentum")} for v in ranked[:check_top]]
    shipped = {k: float(v) for k, v in RECOMMENDED_APG.items()}
    if shipped not in to_check:
        to_check.append(shipped)
    chk = run_grid(pipe, check, [None] + to_check, check_scales, steps, model, checkpoint, log)
    key = (recommended["norm_threshold"], recommended["momentum"], recommended["eta"])
    chk_verdict = next(v for v in verdicts(chk, rule) if (v["norm_threshold"], v["momentum"], v["eta"]) == key)
    clean = {"CFG": largest_clean_scale(chk, None)}
    clean.update({f"APG(r={s['norm_threshold']:g}, β={s['momentum']:g}, η={s['eta']:g})": largest_clean_scale(chk, s)
                  for s in to_check})
    return {"selection": sel, "check": chk, "ranking": ranked, "recommended": recommended,
            "fallback": not ranked[0]["meets_rule"], "check_verdict": chk_verdict,
            "check_meets_rule": chk_verdict["meets_rule"], "clean_scales": clean}


def _cell(row: Optional[dict]) -> str:
    if row is None:
        return "—"
    return (f"{row['all3']:.1%} / {row['texture']:.1%} / {row['invented']:.0%} / {row['saturation']:.3f} / "
            f"{row['clipped']:.3f}")


def markdown(result: dict, rule: Rule = Rule(), scales: Optional[Sequence[float]] = None) -> str:
    """One `run_grid` result as a table: a row per setting, a cell per scale (all three / texture /
    invented / saturation / clipped), and whether the setting meets the rule on these prompts."""
    scales = [float(s) for s in (scales or result["scales"])]
    judged = {(v["norm_threshold"], v["momentum"], v["eta"]): v for v in verdicts(result, rule)}
    w = result["world"]
    head = "| guidance | r | β | η | " + " | ".join(f"w = {s:g}" for s in scales) + " | worst gap | meets rule |"
    lines = [head, "|" + "---|" * (6 + len(scales))]
    lines.append(f"| world images ({w['draws']} draws per caption) | | | | {_cell(w)} |" + " |" * (len(scales) - 1)
                 + " | |")
    groups: dict = {}
    for row in result["rows"]:
        groups.setdefault(None if row["method"] == "cfg" else _setting(row), {})[float(row["scale"])] = row
    for key, at in groups.items():
        cells = " | ".join(_cell(at.get(s)) for s in scales)
        if key is None:
            lines.append(f"| CFG | | | | {cells} | | |")
            continue
        v = judged[key]
        verdict = "yes" if v["meets_rule"] else ("no: saturation" if v["keeps_texture"] else
                                                 "no: texture" + ("" if v["keeps_saturation"] else ", saturation"))
        lines.append(f"| APG | {key[0]:g} | {key[1]:g} | {key[2]:g} | {cells} | {v['worst_gap']:.3f} | {verdict} |")
    return "\n".join(lines)


def report(result: dict, rule: Rule = Rule()) -> str:
    """The whole of a `select_and_check` result as Markdown: the rule, the selection table, the check table, the
    pick and where textures start to be invented."""
    sel, chk = result["selection"], result["check"]
    parts = [
        "Rule: " + rule.text(),
        "",
        "The saturation is not read at the default scale w = 3: APG's rescaling hardly acts there, every setting "
        "gives the same saturation, so the condition would judge the prompt set's sampling noise, not the setting.",
        "",
        "Cells: all three / texture (every prompt) / invented texture (of the prompts asking for none) / mean "
        "saturation / clipped fraction. Worst gap: the largest |saturation − world's| over the rule's scales.",
        "",
        f"## Selection: {len(sel['prompts'])} prompts (shuffle {sel['shuffle']}, noise seeds {sel['seed']} + i)",
        "",
        markdown(sel, rule),
        "",
        f"## Check: {len(chk['prompts'])} prompts never used for selection (shuffle {chk['shuffle']} without the "
        f"selection's captions, noise seeds {chk['seed']} + i)",
        "",
        markdown(chk, rule),
        "",
        f"Recommended: {json.dumps(result['recommended'])}"
        + (" (fallback: no setting met the rule on the selection prompts)" if result["fallback"] else ""),
        f"On the check prompts it {'meets' if result['check_meets_rule'] else 'does NOT meet'} the rule.",
        "Largest scale without invented textures on the check prompts: "
        + ", ".join(f"{k}: {'none' if v is None else f'w = {v:g}'}" for k, v in result["clean_scales"].items()),
    ]
    return "\n".join(parts) + "\n"


def save(result: dict, out: str | Path, rule: Rule = Rule()) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "apg_grid.json").write_text(json.dumps({**result, "rule": {**asdict(rule), "text": rule.text()}},
                                                  indent=2) + "\n")
    (out / "apg_grid.md").write_text(report(result, rule))
    return out
