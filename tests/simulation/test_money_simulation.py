"""The deterministic simulation of the money system (devtools.money_sim), a bounded number of
seeds per run of the suite; `make soak SEEDS=N` runs many. A failing seed raises with the one
command that replays it."""

import os
from collections import Counter

import pytest

from devtools.money_sim import run_seed

SEEDS = int(os.environ.get("MONEY_SIM_SEEDS", "8"))
STEPS = int(os.environ.get("MONEY_SIM_STEPS", "200"))


@pytest.mark.django_db(transaction=True)
def test_money_simulation_keeps_every_invariant(postgres, settings, capsys):
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    totals: Counter = Counter()
    for seed in range(1, SEEDS + 1):
        totals.update(run_seed(seed, STEPS))
    assert totals["steps"] == SEEDS * STEPS
    # The walk reaches the faults it is about (so that a change cannot silently stop exercising them).
    for fault in ("crash_worker_before_ack", "crash_publisher_mid_run", "crash_callback_stored_not_processed",
                  "meter_reboot", "mpesa_same_money_by_c2b", "mpesa_push_answer_lost", "broker_duplicate"):
        assert totals[fault] > 0, fault
    with capsys.disabled():
        print(f"\nmoney simulation: {SEEDS} seeds, {totals.pop('steps')} steps, faults: {dict(sorted(totals.items()))}")
