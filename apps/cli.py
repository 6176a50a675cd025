"""The `guidekit` command. Each subcommand lives in its own module and is imported only when used."""

from __future__ import annotations

import importlib
import importlib.util
import math
import re

import click

from .quiet import quiet

# name -> "module:attribute" of a click command; modules load lazily so `guidekit --help` stays fast.
SUBCOMMANDS = {
    "generate": "guidekit.apps.generate:generate",
    "style": "guidekit.apps.style:style",
    "bench": "guidekit.apps.bench:bench",
    "demo": "guidekit.apps.demo:demo",
    "batch": "guidekit.apps.batch:batch",
    "train-toy": "guidekit.apps.train_toy:train_toy",
    "train-toy-motion": "guidekit.apps.train_toy_motion:train_toy_motion",
    "eval-toy": "guidekit.apps.eval_toy:eval_toy",
    "eval-uam": "guidekit.apps.eval_uam:eval_uam",
    "eval-apg": "guidekit.apps.eval_apg:eval_apg",
    "train-toy-classifier": "guidekit.apps.train_toy_classifier:train_toy_classifier",
    "eval-elucd": "guidekit.apps.eval_elucd:eval_elucd",
    "eval-style": "guidekit.apps.eval_style:eval_style",
    "video": "guidekit.apps.video:video",
    "eval-video": "guidekit.apps.eval_video:eval_video",
    "reconstruct": "guidekit.apps.uam_image:reconstruct",
    "edit": "guidekit.apps.uam_image:edit",
}


#----------------------------------------------------------------------------
# Option types shared by the subcommands (this module stays light: click only).

class FiniteFloatRange(click.FloatRange):
    """click.FloatRange that also refuses nan, inf and -inf.

    `float()` accepts all three, and click's range checks let nan through (every comparison with nan is
    false), so a plain FloatRange hands them to the model, which fails much later with a traceback.
    """

    name = "float"

    def convert(self, value, param, ctx):
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number; accepted: {self._accepted()}", param, ctx)
        return super().convert(number, param, ctx)

    def _accepted(self) -> str:
        if self.min is None and self.max is None:
            return "a finite number"
        return f"a finite number {self._describe_range()}"


class ImageSize(click.ParamType):
    """`N` or `WxH` in pixels -> (width, height), each within guidekit's shared bound (MAX_IMAGE_SIDE).

    The model's VAE factor is checked once the model is loaded; the bound is checked here, before anything
    is loaded or allocated.
    """

    name = "size"

    def get_metavar(self, param, ctx=None):
        return "N|WxH"

    def convert(self, value, param, ctx):
        from guidekit.checks import check_image_size

        if isinstance(value, tuple):
            return value
        match = re.fullmatch(r"(\d+)(?:x(\d+))?", str(value).strip().lower())
        if not match:
            self.fail(f"{value!r}; accepted: N or WxH, e.g. 64 or 768x512", param, ctx)
        width = int(match.group(1))
        height = int(match.group(2) or width)
        try:
            return check_image_size(width, height, multiple_of=1)
        except ValueError as e:
            self.fail(str(e), param, ctx)


def check_size_option(pipe, dims, default: int, images: int = 1, name: str = "--size") -> tuple[int, int]:
    """The `--size` option's (width, height), or `default` for both, checked once the model is loaded: a multiple
    of the model's size rule (`guidekit.apps.jobs.size_multiple`, the one every entry point uses) and small enough
    that `images` images can be decoded in the free memory. Raises a click usage error (exit code 2) naming `name`.
    """
    from guidekit.checks import check_image_memory, check_image_size

    from .jobs import size_multiple

    width, height = dims or (default, default)
    names = (name, name) if width == height else (f"{name} width", f"{name} height")
    try:
        check_image_size(width, height, multiple_of=size_multiple(pipe), names=names)
        check_image_memory(pipe, width, height, images=images, name=name)
    except ValueError as e:
        raise click.BadParameter(f"{e} (for this model)", param_hint=f"'{name}'") from None
    return width, height


VERBOSE_HELP = ("Show the libraries' loading bars and notes too. Default: guidekit's messages and warnings, "
                "the libraries' warnings a user can act on, and the denoising and download progress bars.")
VERBOSE_KEY = "guidekit.verbose"


def verbose_option() -> click.Option:
    # LazyGroup.parse_args reads the flag from the raw arguments; the option itself only lets click accept it.
    return click.Option(["--verbose"], is_flag=True, expose_value=False, help=VERBOSE_HELP)


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(name for name, target in SUBCOMMANDS.items() if importlib.util.find_spec(target.split(":")[0]))

    def get_command(self, ctx, name):
        target = SUBCOMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        if importlib.util.find_spec(module) is None:
            return None
        command = getattr(importlib.import_module(module), attr)
        if not any(param.name == "verbose" for param in command.params):  # `guidekit CMD --verbose` too
            command.params.append(verbose_option())
        return command

    def parse_args(self, ctx, args):
        words = args[:args.index("--")] if "--" in args else args
        ctx.meta[VERBOSE_KEY] = "--verbose" in words  # before the group's or the subcommand's option is parsed
        return super().parse_args(ctx, args)

    def invoke(self, ctx):
        # Here, before the subcommand's module is imported (transformers warns at import time), and after
        # parsing, so that --help and --version stay fast.
        if not ctx.meta.get(VERBOSE_KEY):
            ctx.call_on_close(quiet())
        return super().invoke(ctx)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="guidekit")
@click.option("--verbose", is_flag=True, expose_value=False, help=VERBOSE_HELP)
def main():
    """guidekit: training-free guidance and editing for diffusers pipelines."""


if __name__ == "__main__":
    main()
