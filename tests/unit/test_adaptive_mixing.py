"""Online mixing (Aioli-style): the exponentiated-gradient update and the seeded sampler."""

from __future__ import annotations

from collections import Counter

from posttrain.training.adaptive_mixing import MixtureSampler, eg_update


def test_update_moves_weight_toward_a_domain_whose_loss_falls_when_trained() -> None:
    # Training on `a` lowers a's loss (and b's a little); training on `b` changes nothing.
    interaction = {"a": {"a": 0.5, "b": 0.1}, "b": {"a": 0.0, "b": 0.0}}
    new = eg_update({"a": 0.5, "b": 0.5}, interaction, step_size=1.0, floor=0.0)
    assert new["a"] > 0.5 > new["b"] and abs(sum(new.values()) - 1) < 1e-12
    # Exactly p_j * exp(eta * gain_j), renormalised.
    assert abs(new["a"] / new["b"] - 2.718281828**0.6) < 1e-6
    # A domain whose training raises the other losses loses weight; no signal keeps the proportions.
    hurt = {"a": {"a": 0.0, "b": -0.3}, "b": {"a": 0.0, "b": 0.0}}
    assert eg_update({"a": 0.5, "b": 0.5}, hurt, 1.0, 0.0)["a"] < 0.5
    flat = {"a": {"a": 0.0, "b": 0.0}, "b": {"a": 0.0, "b": 0.0}}
    assert eg_update({"a": 0.3, "b": 0.7}, flat, 1.0, 0.0) == {"a": 0.3, "b": 0.7}


def test_floor_keeps_every_domain() -> None:
    interaction = {"a": {"a": 50.0}, "b": {"a": 0.0}}
    new = eg_update({"a": 0.5, "b": 0.5}, interaction, step_size=1.0, floor=0.05)
    assert new["b"] >= 0.05 / (1 + 0.05) - 1e-12


def test_sampler_follows_the_proportions_and_reruns_to_the_same_order() -> None:
    domains = ["a"] * 50 + ["b"] * 50
    sampler = MixtureSampler(domains, {"a": 0.9, "b": 0.1}, seed=1)
    order = list(sampler)
    assert len(order) == len(sampler) == 100 and sampler.drawn == order
    share_a = Counter(domains[i] for i in order)["a"] / 100
    assert share_a > 0.8
    assert order == list(MixtureSampler(domains, {"a": 0.9, "b": 0.1}, seed=1))
    # An update between draws applies to the next draws.
    sampler.proportions = {"a": 0.0, "b": 1.0}
    assert all(domains[i] == "b" for i in list(sampler)[:20])
