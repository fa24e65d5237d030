"""karl-verl: KARL (Knowledge-Aware Reinforcement Learning, arXiv 2503.12797) for verl 0.9.

Where things are:
  * the reward formula (KA-IoU + format): :mod:`karl_verl.reward`
  * box reading and IoU: :mod:`karl_verl.boxes`
  * mastery levels, thresholds and the mastery table: :mod:`karl_verl.mastery`
  * all configuration (reward presets, advantage weights, probe settings): :mod:`karl_verl.config`
  * the ``karl_grpo`` advantage: :mod:`karl_verl.advantage`
  * verl glue (reward manager, estimator and trainer registration): :mod:`karl_verl.integration`

Importing the package registers karl-verl's parts into verl's registries: at once when verl is
already imported, else when verl's import finishes. This import is also how every verl process gets
them: verl imports (never calls) the ``verl.plugins`` entry point, ``karl_verl.integration``, whose
parent package is this one. ``import karl_verl.reward`` alone imports neither verl nor torch.
"""

from __future__ import annotations

from karl_verl.integration import register_when_verl_loads

__version__ = "0.1.0"

register_when_verl_loads()
