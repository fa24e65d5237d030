"""Hydra recipes of karl-verl (config group ``recipe``), installed as ``karl_verl.recipes``."""
