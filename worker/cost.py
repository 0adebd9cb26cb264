"""What a result cost, and a budget that stops spending.

Prices come from the ``[prices."MODEL"]`` tables of the settings (USD per million
prompt and completion tokens, and a multiplier per consumption tier). A model without a
price, or a tier without a multiplier, costs ``None``: unknown, never a guess.
Provisioned Throughput is paid for by the hour, not per token: a request sent with
``provisioned = "only"`` costs ``None`` too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .settings import PriceSettings, ProvisionedMode, Tier

__all__ = ["Budget", "Prices"]


@dataclass(frozen=True, slots=True)
class _Price:
    input_usd_per_token: float
    output_usd_per_token: float
    multipliers: Mapping[Tier, float | None]


class Prices:
    """The price table, looked up per answer (cheap: one dict lookup, two products)."""

    def __init__(
        self, table: Mapping[str, PriceSettings], *, provisioned: ProvisionedMode = "auto"
    ) -> None:
        self._table = {
            model: _Price(
                p.input_usd_per_mtok / 1e6,
                p.output_usd_per_mtok / 1e6,
                {
                    "standard": 1.0,
                    "flex": p.flex_multiplier or None,
                    "priority": p.priority_multiplier or None,
                },
            )
            for model, p in table.items()
        }
        self._provisioned = provisioned

    def knows(self, model: str) -> bool:
        return model in self._table

    def cost_usd(self, model: str, usage: Mapping[str, int] | None, tier: Tier) -> float | None:
        """USD for one answer's ``usage`` at ``tier``; None when it cannot be known."""
        price = self._table.get(model)
        if price is None or usage is None or self._provisioned == "only":
            return None
        multiplier = price.multipliers[tier]
        if multiplier is None:
            return None
        prompt = usage.get("prompt_tokens", 0)
        completion = usage.get("completion_tokens", 0)
        return multiplier * (
            prompt * price.input_usd_per_token + completion * price.output_usd_per_token
        )


class Budget:
    """``--budget-usd``: spend counted answer by answer; once it reaches the limit, the
    owner is told (once) and admits nothing more. What was already talking to the model
    finishes, so the spend passes the limit by at most what was in flight then."""

    __slots__ = ("exhausted", "limit_usd", "on_exhausted", "spent_usd")

    def __init__(self, limit_usd: float, on_exhausted: Callable[[], None] | None = None) -> None:
        self.limit_usd = limit_usd
        self.spent_usd = 0.0
        self.exhausted = False
        #: Told once, when the spend reaches the limit.
        self.on_exhausted = on_exhausted

    def charge(self, cost_usd: float) -> None:
        self.spent_usd += cost_usd
        if not self.exhausted and self.spent_usd >= self.limit_usd:
            self.exhausted = True
            if self.on_exhausted is not None:
                self.on_exhausted()
