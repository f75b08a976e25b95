"""One source of defaults: README's table is the generated one, and the command, the demo and the
library read the same values (issue "A newcomer's first hour", point 7)."""

from __future__ import annotations

import math
from pathlib import Path

from attnguide.apps.cli import build_parser
from attnguide.apps.defaults import (
    CFG_DEFAULT,
    NUM_IMAGES,
    SCHEDULER,
    SEED,
    STEPS,
    defaults_table,
    term_flags,
)

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_shows_the_generated_defaults_table():
    assert defaults_table() in README.read_text(), (
        "README's defaults table is stale: paste attnguide.apps.defaults.defaults_table()"
    )


def test_the_command_takes_its_defaults_from_the_table():
    args = build_parser().parse_args(["sample"])
    assert (args.cfg_scale, args.steps, args.scheduler, args.seed) == (CFG_DEFAULT, STEPS, SCHEDULER, SEED)
    assert args.num_images == NUM_IMAGES
    for _, dest, setting, _ in term_flags():
        assert getattr(args, dest) == setting.app_default, dest


def test_the_demo_offers_the_commands_ranges():
    from attnguide.apps.demo import TERM_FIELDS, InputError, _setting

    in_demo = {id(p) for _, _, p in TERM_FIELDS}
    assert all(id(p) in in_demo for _, _, p, _ in term_flags() if p.label)
    for _, _, p in TERM_FIELDS:
        top = math.inf if p.inf_allowed else p.high
        assert _setting(p, top) == top  # the CLI's upper end is accepted
        try:
            _setting(p, -1.0)
        except InputError as err:
            assert p.allowed() in str(err)
        else:
            raise AssertionError(f"{p.label}: -1 accepted")
