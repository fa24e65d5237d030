"""karl-verl: KARL (Knowledge-Aware Reinforcement Learning, arXiv 2503.12797) for verl 0.9.

Where things are:
  * the reward formula (KA-IoU + format): :mod:`karl_verl.reward`
  * box reading and IoU: :mod:`karl_verl.boxes`
  * mastery levels, thresholds and the mastery table: :mod:`karl_verl.mastery`
  * all configuration (reward presets, advantage weights, probe settings): :mod:`karl_verl.config`
  * the ``karl_grpo`` advantage: :mod:`karl_verl.advantage`
  * verl glue (reward manager, estimator and trainer registration): :mod:`karl_verl.integration`

Importing the package registers karl-verl's parts into verl's registries when verl is installed
(the ``verl.plugins`` entry point does the same in every verl process).
"""

from __future__ import annotations

import importlib.util

__version__ = "0.1.0"

if importlib.util.find_spec("verl") is not None:
    from karl_verl.integration import register_all

    register_all()
