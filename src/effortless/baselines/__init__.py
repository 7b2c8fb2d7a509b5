"""The methods `effortless bench` compares, one module each, behind one small interface.

``fit(task, split, seed, epochs, progress) -> Fitted``; ``Fitted.predict(x) -> probs (B, C)``.
Every method trains the task's network on the same data order and is evaluated by the same code
(:mod:`effortless.experiments.bench`). Peers (ivon-opt) appear only when installed.
"""

from __future__ import annotations

from .methods import METHODS, Fitted, available

__all__ = ["METHODS", "Fitted", "available"]
