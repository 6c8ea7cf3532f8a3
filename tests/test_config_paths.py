"""The one config path: CLI flags and Hydra dicts both end in ``ringrt.run.schema.from_dict``.

Flags build a new object from the defaults (never changing them), ``__post_init__`` checks the final
values, ``none``/``null`` reach an optional field, and a mistyped flag or value is exit 2 with a
message that names it.
"""

from __future__ import annotations

import argparse
import copy

import pytest

from ringrt.cli import main
from ringrt.jobs.config import TrainJobConfig
from ringrt.jobs.flags import add_dataclass_arguments, build


def _build(argv: list[str], defaults: TrainJobConfig | None = None) -> TrainJobConfig:
    p = argparse.ArgumentParser()
    add_dataclass_arguments(p, TrainJobConfig, defaults)
    return build(TrainJobConfig, p.parse_args(argv), defaults)


def test_build_leaves_the_defaults_alone_and_checks_the_final_values():
    defaults = TrainJobConfig()
    before = copy.deepcopy(defaults)
    cfg = _build(["--train.steps", "7", "--model.n_heads", "8", "--model.n_kv_heads", "4"], defaults)
    assert (cfg.train.steps, cfg.model.n_heads, cfg.model.n_kv_heads) == (7, 8, 4)
    assert defaults == before and cfg is not defaults and cfg.model is not defaults.model


def test_post_init_sees_the_final_values(capsys):
    # each flag alone is fine against the defaults; together they break a rule of ProbeConfig's
    # __post_init__, which must therefore run once, on the final values
    assert main(["probe", "--heads", "6", "--kv-heads", "4"]) == 2
    assert "ringrt probe: error: probe.heads=6 must be a multiple of probe.kv_heads=4" in capsys.readouterr().err


@pytest.mark.parametrize("word", ["null", "none"])
def test_none_reaches_an_optional_field(word):
    assert TrainJobConfig().model.n_kv_heads is not None
    assert _build(["--model.n_kv_heads", word]).model.n_kv_heads is None


@pytest.mark.parametrize(
    "argv, says",
    [
        (["probe", "--causal", "maybe"], "'maybe' must be true or false"),
        (["train", "--compression.baselines", "none", "x"], "'x' is not valid; valid: 'none', 'truncate', 'lambda'"),
        (["train", "--train.steps", "ten"], "argument --train.steps: 'ten' must be an integer"),
        (["train", "--train.stpes", "10"], "did you mean: --train.stpes -> --train.steps?"),
        (["eval", "--eval.tokns=512"], "did you mean: --eval.tokns -> --eval.tokens?"),
    ],
)
def test_bad_flags_exit_2_naming_the_flag(argv, says, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert says in err, err
