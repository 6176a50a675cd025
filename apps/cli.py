"""The `guidekit` command. Each subcommand lives in its own module and is imported only when used."""

from __future__ import annotations

import importlib
import importlib.util
import os

import click

# name -> "module:attribute" of a click command; modules load lazily so `guidekit --help` stays fast.
SUBCOMMANDS = {
    "generate": "guidekit.apps.generate:generate",
    "bench": "guidekit.apps.bench:bench",
    "demo": "guidekit.apps.demo:demo",
    "batch": "guidekit.apps.batch:batch",
    "train-toy": "guidekit.apps.train_toy:train_toy",
    "eval-toy": "guidekit.apps.eval_toy:eval_toy",
    "eval-uam": "guidekit.apps.eval_uam:eval_uam",
}


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
        return getattr(importlib.import_module(module), attr)


# transformers warns at import time about optional image backends the CLI never uses; keep the
# terminal for guidekit's own output unless the user asked for transformers' messages.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="guidekit")
def main():
    """guidekit: training-free guidance and editing for diffusers pipelines."""


if __name__ == "__main__":
    main()
