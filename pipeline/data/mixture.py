"""The fine-tuning task mixture: each task's share of the training examples (`finetune.mixing`), and the dataset
that draws from the tasks in those shares.
"""

from __future__ import annotations

from pipeline.data.tasks import Example


def mixing_rates(
    sizes: dict[str, int], mixing: str = "examples_proportional", temperature: float = 1.0, cap: int | None = None
) -> dict[str, float]:
    """Sampling rate of each task (T5 paper, section 3.5.2); rates sum to 1, empty tasks get 0.

    - `examples_proportional`: r_m = min(e_m, K) / sum_n min(e_n, K), with K = `cap` (None: no limit);
    - `temperature`: those rates raised to the power 1/T and renormalised (T = 1 is examples-proportional,
      large T approaches equal mixing);
    - `equal`: every non-empty task the same rate.
    """
    if not sizes or all(size <= 0 for size in sizes.values()):
        raise ValueError(f"no examples to mix: {sizes}")
    if cap is not None and cap < 1:
        raise ValueError(f"mixing cap must be >= 1, got {cap}")
    capped = {
        name: float(min(size, cap) if cap is not None else size) if size > 0 else 0.0 for name, size in sizes.items()
    }
    if mixing == "equal":
        weights = {name: 1.0 if size > 0 else 0.0 for name, size in capped.items()}
    elif mixing == "examples_proportional":
        weights = capped
    elif mixing == "temperature":
        if temperature <= 0:
            raise ValueError(f"mixing temperature must be > 0, got {temperature}")
        total = sum(capped.values())
        weights = {name: (size / total) ** (1.0 / temperature) for name, size in capped.items()}
    else:
        raise ValueError(f"unknown mixing {mixing!r}; expected examples_proportional, temperature or equal")
    total = sum(weights.values())
    return {name: weight / total for name, weight in weights.items()}


class Mixture:
    """A map-style mixture: item `i` draws a task by its rate, then one of its examples, from (seed, i) alone.

    Sampling is with replacement, so the same `i` always gives the same example (resumable) and a task's
    share of the items approaches its rate. `len` defaults to the total number of examples.
    """

    def __init__(
        self, task_examples: dict[str, list[Example]], rates: dict[str, float], seed: int, length: int | None = None
    ):
        self.names = [name for name, examples in task_examples.items() if examples and rates.get(name, 0.0) > 0]
        if not self.names:
            raise ValueError("a mixture needs at least one task with examples and a positive rate")
        import numpy as np

        self.examples = {name: task_examples[name] for name in self.names}
        weights = np.array([rates[name] for name in self.names], dtype=np.float64)
        self.cumulative = np.cumsum(weights / weights.sum())  # (num_tasks,)
        self.seed = seed
        self.length = sum(len(v) for v in self.examples.values()) if length is None else length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[str, Example]:
        if not 0 <= i < self.length:
            raise IndexError(f"mixture index {i} out of range [0, {self.length})")
        import numpy as np

        rng = np.random.default_rng(np.random.SeedSequence([self.seed, i]))
        task = min(int(np.searchsorted(self.cumulative, rng.random(), side="right")), len(self.names) - 1)
        name = self.names[task]
        examples = self.examples[name]
        return name, examples[int(rng.integers(len(examples)))]
