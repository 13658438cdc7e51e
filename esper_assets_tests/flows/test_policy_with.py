"""``policy_with``: the one place a retention policy is changed by a caller's rules
(the retention job's run config, ``esper checkpoints prune``'s options); each names a
bad value as its caller spells it."""

from __future__ import annotations

from datetime import timedelta

import pytest

from esper_assets.checkpoints import RetentionPolicy
from esper_assets.cli.checkpoints import PRUNE_OPTIONS
from esper_assets.errors import InvalidInput
from esper_assets.flows.checkpoints import NO_RULES, policy_with

BASE = RetentionPolicy(keep_last=5, keep_newer_than=timedelta(days=7), action="archive")


def test_given_rules_replace_the_base_and_the_rest_stay():
    changed = policy_with(BASE, keep_last=2, keep_newer_than_days=0, keep_best=1,
                          metric="loss", higher_is_better=True, action="delete")  # fmt: skip
    assert changed == RetentionPolicy(keep_last=2, keep_newer_than=timedelta(0), keep_best=1,
                                      metric="loss", higher_is_better=True, action="delete")  # fmt: skip
    assert policy_with(BASE) == BASE
    assert policy_with(NO_RULES, keep_every=10) == RetentionPolicy(
        keep_last=None, keep_every=10, keep_newer_than=None
    )


@pytest.mark.parametrize(
    ("rules", "as_keyword", "as_option"),
    [
        ({"keep_last": -1}, "keep_last must be >= 0", "--keep-last must be >= 0"),
        ({"keep_every": 0}, "keep_every must be >= 1", "--keep-every must be >= 1"),
        ({"keep_newer_than_days": float("nan")}, "keep_newer_than_days must be >= 0",
         "--keep-days must be >= 0"),
        ({"keep_best": 2}, "keep_best needs metric NAME", "--keep-best needs --metric NAME"),
        ({"metric": "loss"}, "metric is used only with keep_best K",
         "--metric is used only with --keep-best K"),
    ],
)  # fmt: skip
def test_a_bad_rule_is_named_as_the_caller_spells_it(rules, as_keyword, as_option):
    with pytest.raises(InvalidInput, match=as_keyword):
        policy_with(BASE, **rules)
    with pytest.raises(InvalidInput, match=as_option):
        policy_with(BASE, **rules, names=PRUNE_OPTIONS)
