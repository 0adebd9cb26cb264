"""What a result cost: the arithmetic from usage, tier and the price table; the records'
``cost_usd``, ``endpoint`` and ``tier``; and ``worker_cost_usd_total`` on /metrics."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from worker.app import run_worker
from worker.cost import Budget, Prices
from worker.settings import DEFAULT_MODEL, PriceSettings, Tier, default_prices
from worker.simulator import RegionConfig, SimConfig, Simulator

from .endpoint_helpers import metric_samples, outputs, region_settings, telemetry
from .helpers import jobs_file

USAGE = {"prompt_tokens": 1000, "completion_tokens": 100, "total_tokens": 1100}
# google/gemini-2.0-flash-001 at list price: $0.15 per 1M prompt tokens, $0.60 per 1M
# completion tokens.
STANDARD_USD = 1000 * 0.15e-6 + 100 * 0.60e-6


def test_standard_cost_is_prompt_and_completion_tokens_at_list_price() -> None:
    prices = Prices(default_prices())
    assert prices.knows(DEFAULT_MODEL)
    assert prices.cost_usd(DEFAULT_MODEL, USAGE, "standard") == pytest.approx(STANDARD_USD)


def test_flex_costs_its_multiplier_of_standard() -> None:
    prices = Prices(default_prices())
    assert prices.cost_usd(DEFAULT_MODEL, USAGE, "flex") == pytest.approx(0.5 * STANDARD_USD)


def test_priority_without_a_known_multiplier_costs_none() -> None:
    assert Prices(default_prices()).cost_usd(DEFAULT_MODEL, USAGE, "priority") is None


def test_a_priority_multiplier_when_configured() -> None:
    table = {"m": PriceSettings(1.0, 2.0, flex_multiplier=0.5, priority_multiplier=1.8)}
    prices = Prices(table)
    # 1000 x $1/M + 100 x $2/M = $0.0012
    assert prices.cost_usd("m", USAGE, "standard") == pytest.approx(0.0012)
    assert prices.cost_usd("m", USAGE, "priority") == pytest.approx(1.8 * 0.0012)
    assert prices.cost_usd("m", USAGE, "flex") == pytest.approx(0.5 * 0.0012)


def test_an_unknown_model_costs_none() -> None:
    prices = Prices(default_prices())
    assert not prices.knows("someone/elses-model")
    for tier in ("standard", "flex", "priority"):
        assert prices.cost_usd("someone/elses-model", USAGE, tier) is None


def test_provisioned_only_costs_none() -> None:
    # Provisioned Throughput is paid by the hour, not per token.
    prices = Prices(default_prices(), provisioned="only")
    for tier in ("standard", "flex", "priority"):
        assert prices.cost_usd(DEFAULT_MODEL, USAGE, tier) is None
    assert Prices(default_prices(), provisioned="never").cost_usd(
        DEFAULT_MODEL, USAGE, "standard"
    ) == pytest.approx(STANDARD_USD)


def test_without_usage_the_cost_is_unknown_and_missing_counts_are_zero() -> None:
    prices = Prices(default_prices())
    assert prices.cost_usd(DEFAULT_MODEL, None, "standard") is None
    assert prices.cost_usd(DEFAULT_MODEL, {"prompt_tokens": 1000}, "standard") == pytest.approx(
        1000 * 0.15e-6
    )


def test_budget_tells_once_when_the_spend_reaches_the_limit() -> None:
    told: list[float] = []
    budget = Budget(1.0)
    budget.on_exhausted = lambda: told.append(budget.spent_usd)
    budget.charge(0.4)
    budget.charge(0.5)
    assert not budget.exhausted
    assert told == []
    budget.charge(0.1)  # exactly the limit: spent
    assert budget.exhausted
    assert told == [pytest.approx(1.0)]
    budget.charge(0.3)  # what was in flight still counts, and is not told again
    assert budget.spent_usd == pytest.approx(1.3)
    assert len(told) == 1


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    cfg = SimConfig(regions=(RegionConfig("us-central1"), RegionConfig("global")))
    async with Simulator(cfg) as s:
        yield s


async def test_records_and_metrics_carry_the_cost(sim: Simulator, tmp_path: Path) -> None:
    tiers: list[Tier] = ["standard", "flex", "priority"]
    lines = [
        json.dumps(
            {
                "id": f"job-{i}",
                "image_uri": f"gs://bucket/{'x' * i}img-{i}.jpg",
                "tier": tiers[i % 3],
                # prompts of different lengths: different usage, different costs
                "prompt": "Describe " + "this " * i + "image:",
            }
        )
        for i in range(15)
    ]
    s = region_settings(sim, tmp_path, "us-central1", "global")
    s.worker.source = jobs_file(tmp_path, lines)
    t = telemetry()
    stats = await run_worker(s.validate(), telemetry=t)
    results, dead = outputs(s)
    assert dead == []
    assert len(results) == 15
    prices = Prices(default_prices())
    spent: dict[str, float] = defaultdict(float)
    for record in results:
        tier = record["tier"]
        assert record["endpoint"] in ("us-central1", "global")
        assert record["model"] == DEFAULT_MODEL
        usage = record["usage"]
        assert usage["prompt_tokens"] > 258  # the image, and the prompt's words
        expected = prices.cost_usd(DEFAULT_MODEL, usage, tier)
        if tier == "priority":
            assert record["cost_usd"] is None  # no published multiplier: unknown
            assert expected is None
            continue
        assert expected is not None
        assert record["cost_usd"] == pytest.approx(expected, rel=1e-12)
        spent[tier] += record["cost_usd"]
    assert {r["tier"] for r in results} == set(tiers)
    assert len({r["cost_usd"] for r in results if r["tier"] == "standard"}) == 5
    assert set(spent) == {"standard", "flex"}
    # Flex, same kind of jobs, at half the price.
    assert 0 < spent["flex"] < spent["standard"]
    samples = metric_samples(t, "worker_cost_usd_total")
    assert samples == {
        (("model", DEFAULT_MODEL), ("tier", "flex")): pytest.approx(spent["flex"]),
        (("model", DEFAULT_MODEL), ("tier", "standard")): pytest.approx(spent["standard"]),
    }
    assert stats.cost_usd == pytest.approx(spent["flex"] + spent["standard"])
    # What the bill is made of: every answer's tokens, by tier and kind (priority too,
    # whose price is unknown).
    tokens = metric_samples(t, "worker_model_tokens_total")
    for tier in set(tiers):
        for kind in ("prompt", "completion"):
            labels = (("kind", kind), ("model", DEFAULT_MODEL), ("tier", tier))
            assert tokens[labels] == sum(
                r["usage"][f"{kind}_tokens"] for r in results if r["tier"] == tier
            )
    assert stats.summary()["cost_usd"] == pytest.approx(stats.cost_usd, abs=1e-6)
    # No budget set: no budget gauges.
    assert metric_samples(t, "worker_budget_usd") == {}


async def test_an_unpriced_model_has_no_cost(sim: Simulator, tmp_path: Path) -> None:
    s = region_settings(sim, tmp_path, "us-central1")
    s.model.model = "someone/elses-model"
    s.worker.source = jobs_file(
        tmp_path, [json.dumps({"id": "a", "image_uri": "gs://bucket/a.jpg"})]
    )
    t = telemetry()
    stats = await run_worker(s.validate(), telemetry=t)
    (record,) = outputs(s)[0]
    assert record["cost_usd"] is None
    assert record["usage"] is not None
    assert stats.cost_usd is None
    assert stats.summary()["cost_usd"] is None
    assert metric_samples(t, "worker_cost_usd_total") == {}
    # Its tokens are counted all the same.
    tokens = metric_samples(t, "worker_model_tokens_total")
    labels = (("kind", "prompt"), ("model", "someone/elses-model"), ("tier", "standard"))
    assert tokens[labels] == record["usage"]["prompt_tokens"]
