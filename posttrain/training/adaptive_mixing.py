"""Online mixture proportions for the SFTTrainer stages (pretrain, cpt, sft), Aioli-style.

`mixtures.<stage>.adaptive: {method: aioli, ...}` turns it on; the static weights of the mixture are
the starting proportions. The stage's training rows are then drawn by a seeded sampler from the
current proportions instead of TRL's shuffle. `rounds` times during training (evenly spaced, the
first before step 1):

1. probe: for each domain j, the model takes `probe_steps` optimizer steps (a fresh AdamW at the
   stage's peak learning rate) on batches of domain j's training rows only, then its weights are restored;
2. measure: each domain i's loss per token on its first `eval_items` VALIDATION items (never test)
   before and after each probe: A[j][i] = loss_i(before) - loss_i(after probe j), how much training
   on j lowers i's loss;
3. update: exponentiated gradient on the proportions, p_j <- p_j * exp(step_size * sum_i A[j][i]),
   renormalised with a floor of `min_proportion`.

Budget: the stage's budget is `trainer.max_steps` optimizer steps of the configured batch; the probes'
steps are taken out of it (main steps = max_steps - rounds x domains x probe_steps), so training plus
probes see no more rows than a static-mixture run. Everything is seeded and CPU-deterministic: the
same inputs give the same trajectory and data order. The metrics record the trajectory
(`mixing_trajectory`, also a JSON + PNG under artifacts/plots) and exactly which rows were trained
on and which were probed, by id.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Sampler
from transformers import TrainerCallback

from posttrain.config import AdaptiveMixingConfig, MixtureConfig
from posttrain.errors import ParamsError, StageError
from posttrain.io import read_json
from posttrain.layout import Layout
from posttrain.scoring.loss import mean_token_loss
from posttrain.training.inputs import load_validation_sets, mixture_manifest, read_mixture
from posttrain.training.outputs import write_proportions_plot

log = logging.getLogger(__name__)


def eg_update(
    proportions: Mapping[str, float], interaction: Mapping[str, Mapping[str, float]], step_size: float, floor: float
) -> dict[str, float]:
    """One exponentiated-gradient step: p_j * exp(step_size * sum_i interaction[j][i]), renormalised,
    then every proportion raised to at least `floor` (and renormalised again)."""
    gains = {j: sum(interaction[j].values()) for j in proportions}
    top = max(gains.values())  # subtracted before exp: the same result, no overflow
    raw = {j: p * math.exp(step_size * (gains[j] - top)) for j, p in proportions.items()}
    total = sum(raw.values())
    new = {j: v / total for j, v in raw.items()}
    if floor > 0:
        new = {j: max(v, floor) for j, v in new.items()}
        total = sum(new.values())
        new = {j: v / total for j, v in new.items()}
    return new


class MixtureSampler(Sampler[int]):
    """Row indices drawn domain by domain from `proportions` (read at every draw, so updates apply).

    Within a domain, rows come in a seeded shuffled order, reshuffled after each pass. The rng lives
    as long as the sampler, so a second epoch continues the stream instead of repeating it.
    """

    def __init__(self, row_domains: Sequence[str], proportions: Mapping[str, float], seed: int) -> None:
        self.by_domain: dict[str, list[int]] = {}
        for index, domain in enumerate(row_domains):
            self.by_domain.setdefault(domain, []).append(index)
        self.proportions = dict(proportions)
        self.size = len(row_domains)
        self.rng = random.Random(f"{seed}:online-mixing")
        self.queues: dict[str, list[int]] = {d: [] for d in self.by_domain}
        self.drawn: list[int] = []

    def __len__(self) -> int:
        return self.size

    def next_index(self, domain: str) -> int:
        if not self.queues[domain]:
            self.queues[domain] = self.rng.sample(self.by_domain[domain], len(self.by_domain[domain]))
        return self.queues[domain].pop()

    def __iter__(self) -> Iterator[int]:
        for _ in range(self.size):
            domains = sorted(self.by_domain)
            domain = self.rng.choices(domains, weights=[self.proportions.get(d, 0.0) for d in domains])[0]
            index = self.next_index(domain)
            self.drawn.append(index)
            yield index


class OnlineMixing(TrainerCallback):
    """The sampler, the probe rounds (a Trainer callback) and the record of one stage's online mixing."""

    def __init__(
        self,
        stage: str,
        config: AdaptiveMixingConfig,
        initial: Mapping[str, float],
        row_domains: Sequence[str],
        row_ids: Sequence[str],
        val_texts: Mapping[str, list[str]],
        layout: Layout,
        *,
        max_steps: int,
        seed: int,
    ) -> None:
        missing = sorted(set(initial) - set(val_texts))
        if missing:
            raise StageError(f"mixtures.{stage}.adaptive: no validation items for domain(s) {missing}")
        self.stage, self.config = stage, config
        self.domains = sorted(initial)
        self.row_ids = list(row_ids)
        self.val_texts = val_texts
        self.layout = layout
        self.sampler = MixtureSampler(row_domains, initial, seed)
        self.seed = seed
        probe_total = config.rounds * len(self.domains) * config.probe_steps
        self.main_steps = max_steps - probe_total
        if self.main_steps < config.rounds:
            raise ParamsError(
                f"mixtures.{stage}.adaptive: probes take {probe_total} of the {max_steps} steps of {stage}.trainer."
                f"max_steps (rounds {config.rounds} x {len(self.domains)} domains x probe_steps {config.probe_steps}); "
                "expected fewer rounds or probe steps, or more max_steps"
            )
        self.update_steps = {round(r * self.main_steps / config.rounds) for r in range(config.rounds)}
        self.history: list[dict[str, Any]] = []
        self.probe_ids: list[str] = []
        self.probe_rows = 0
        self.trainer: Any = None  # set by the trainer subclass (`trainer_class`): probes use its data and collator

    @classmethod
    def for_stage(
        cls, stage: str, mixture: MixtureConfig | None, layout: Layout, max_steps: int, seed: int, tokenizer: Any
    ) -> OnlineMixing | None:
        """The online mixing of `stage` when its mixture sets `adaptive`, else None. The rows' ids and domains
        come from the mixture file (the trainer's dataset holds only its text columns, in the same order);
        the starting proportions are the mixture's output proportions (replayed domains included)."""
        if mixture is None or mixture.adaptive is None:
            return None
        rows = read_mixture(layout, stage, ["id", "domain"])
        initial = read_json(mixture_manifest(layout, stage))["output_proportions"]
        val = load_validation_sets(layout, sorted(initial), mixture.adaptive.eval_items, tokenizer)
        return cls(
            stage,
            mixture.adaptive,
            initial,
            rows["domain"],
            rows["id"],
            {d: v.texts for d, v in val.items()},
            layout,
            max_steps=max_steps,
            seed=seed,
        )

    # ---------------------------------------------------------------- the hook on the Trainer

    def trainer_class(self, base: type) -> type:
        """A subclass of `base` (SFTTrainer) that draws rows through this mixing's sampler."""
        online = self

        class OnlineMixingTrainer(base):  # type: ignore[misc, valid-type]
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                online.trainer = self
                if len(self.train_dataset) != online.sampler.size:
                    raise StageError(
                        f"mixtures.{online.stage}.adaptive: the trainer's dataset has {len(self.train_dataset)} rows, "
                        f"the mixture {online.sampler.size} (packing or filtering changed the rows); "
                        f"expected {online.stage}.packing: false"
                    )

            def _get_train_sampler(self, dataset: Any = None) -> Sampler:
                return online.sampler

        OnlineMixingTrainer.__name__ = OnlineMixingTrainer.__qualname__ = f"OnlineMixing{base.__name__}"
        return OnlineMixingTrainer

    def on_step_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if state.global_step in self.update_steps and not any(h["step"] == state.global_step for h in self.history):
            self.update(state.global_step, model, args)

    # ---------------------------------------------------------------- one round

    def losses(self, model: Any) -> dict[str, float]:
        tokenizer = self.trainer.processing_class
        return {d: mean_token_loss(model, tokenizer, self.val_texts[d], batch_size=64) for d in self.domains}

    def probe(self, model: Any, domain: str, args: Any, round_index: int) -> dict[str, float]:
        """Domain losses after `probe_steps` steps on `domain` alone; the model's weights are restored after.

        Trained in place and restored rather than on a deepcopy: the Trainer's model carries forward
        wrappers bound to the original instance, so a copy's forward would not reach the copy's weights.
        """
        saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
        was_training = model.training
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, weight_decay=args.weight_decay)
        rng = random.Random(f"{self.seed}:probe:{round_index}:{domain}")
        pool = self.sampler.by_domain[domain]
        batch_size = args.per_device_train_batch_size * args.gradient_accumulation_steps
        device = next(model.parameters()).device
        try:
            for _ in range(self.config.probe_steps):
                indices = [rng.choice(pool) for _ in range(batch_size)]
                self.probe_ids += [self.row_ids[i] for i in indices]
                self.probe_rows += len(indices)
                # Token columns only (the rows also hold the raw strings).
                rows = [
                    {k: v for k, v in self.trainer.train_dataset[i].items() if isinstance(v, list)} for i in indices
                ]
                batch = self.trainer.data_collator(rows)
                batch = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
                optimizer.zero_grad()
                model(**batch).loss.backward()
                torch.nn.utils.clip_grad_norm_(trainable, args.max_grad_norm)
                optimizer.step()
            return self.losses(model)
        finally:
            with torch.no_grad():
                model.load_state_dict(saved)
            model.zero_grad(set_to_none=True)
            model.train(was_training)

    def update(self, step: int, model: Any, args: Any) -> None:
        round_index = len(self.history)
        before = self.losses(model)
        interaction = {}
        for domain in self.domains:
            after = self.probe(model, domain, args, round_index)
            interaction[domain] = {i: before[i] - after[i] for i in self.domains}
        old = dict(self.sampler.proportions)
        self.sampler.proportions = eg_update(old, interaction, self.config.step_size, self.config.min_proportion)
        self.history.append(
            {
                "step": step,
                "p": {d: round(p, 6) for d, p in self.sampler.proportions.items()},
                "val_loss": {d: round(v, 6) for d, v in before.items()},
                "interaction": {j: {i: round(v, 6) for i, v in row.items()} for j, row in interaction.items()},
            }
        )
        log.info("%s: online mixing round %d at step %d: %s", self.stage, round_index, step, self.history[-1]["p"])

    # ---------------------------------------------------------------- what the stage records

    def measure(self, run: Any) -> dict[str, Any]:
        """A `TrainingJob.measure` hook: the trajectory (metrics, JSON + plot) and the rows seen, by id."""
        run.artifacts += write_proportions_plot(
            f"{self.stage}_mixing", f"{self.stage}: online mixture proportions", self.history, self.layout
        )
        args = self.trainer.args
        trained = run.metrics["steps"] * args.per_device_train_batch_size * args.gradient_accumulation_steps
        # The dataloader reads ahead: only the first `trained` rows drawn were trained on.
        seen = [self.row_ids[i] for i in self.sampler.drawn[:trained]]
        return {
            "mixing_method": self.config.method,
            "mixing_trajectory": self.history,
            "mixing_final_proportions": self.history[-1]["p"] if self.history else {},
            "mixing_main_steps": self.main_steps,
            "mixing_probe_steps": self.config.rounds * len(self.domains) * self.config.probe_steps,
            "mixing_rows_trained": len(seen),
            "mixing_rows_probed": self.probe_rows,
            "mixing_seen_ids": seen,
            "mixing_probe_ids": self.probe_ids,
        }
